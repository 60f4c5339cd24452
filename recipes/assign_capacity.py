"""Capacity-level alignment: measure where the base model struggles, and keep latent supervision only there.

    python recipes/assign_capacity.py --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --dataset_name DIR \\
        --num_samples 4 --capacity_threshold 0.5 --output_dir outputs/capacity

For each training row (our schema: `images`, `messages`, `aux_images`, `answer`), the *base* model answers the
user turn `num_samples` times (sampling); `base_pass_rate` is the fraction of answers that match `answer` (the
same extraction as `recipes/evaluate.py`), and `use_latent = base_pass_rate <= capacity_threshold`. Rows the base
already solves train as plain text; the others keep their latent span. Writes the dataset with the two columns
(`save_to_disk`) and `capacity_summary.json` (counts, rate histogram).
"""

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


@dataclass
class CapacityArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "The base model (stock Qwen2.5-VL or GAP)."})
    dataset_name: str = field(default=None, metadata={"help": "A `save_to_disk` directory or a Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split to assign."})
    num_samples: int = field(default=4, metadata={"help": "Sampled answers per row."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generated tokens per answer."})
    capacity_threshold: float = field(default=0.5, metadata={"help": "use_latent = base_pass_rate <= this."})
    batch_size: int = field(default=8, metadata={"help": "Rows per generate call."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output_dir: str = field(default="outputs/capacity", metadata={"help": "Where the assigned dataset goes."})


def question_rows(split):
    """EvalRows from training rows: the user turn's text as the question, the `answer` column as gold."""
    from trainers.evaluation import EvalRow, infer_kind

    rows = []
    for index, row in enumerate(split):
        user = next((m for m in row["messages"] if m["role"] == "user"), None)
        if user is None:
            raise ValueError(f"row {index}: no user turn in `messages`.")
        content = user["content"]
        question = content if isinstance(content, str) else " ".join(
            c.get("text") or "" for c in content if c.get("type") == "text")
        answer = str(row.get("answer") or "").strip()
        if not answer:
            raise ValueError(f"row {index}: `answer` is empty; capacity assignment needs a gold answer per row.")
        rows.append(EvalRow(images=row["images"], question=question.strip(), answer=answer, choices=None,
                            kind=infer_kind(answer)))
    return rows


def pass_rates(model, processor, rows, args: CapacityArguments) -> list[float]:
    """The fraction of `num_samples` sampled answers that are right, per row."""
    import torch

    from trainers.evaluation import generate_answers

    correct = [0] * len(rows)
    generate_kwargs = dict(do_sample=True, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    if getattr(model.config, "latent_start_token_id", None) is not None:
        generate_kwargs["latent_intervention"] = "drop"  # the base's own answers, without latent reasoning
    for sample in range(args.num_samples):
        torch.manual_seed(args.seed + sample)
        records = generate_answers(model, processor, rows, batch_size=args.batch_size, progress=False,
                                   **generate_kwargs)
        correct = [c + r["correct"] for c, r in zip(correct, records)]
    return [c / args.num_samples for c in correct]


def summarize(rates: list[float], use_latent: list[bool], threshold: float) -> dict:
    histogram = Counter(round(r, 3) for r in rates)
    return dict(rows=len(rates), use_latent=sum(use_latent), plain_text=len(use_latent) - sum(use_latent),
                capacity_threshold=threshold, mean_pass_rate=sum(rates) / max(len(rates), 1),
                pass_rate_histogram={str(k): v for k, v in sorted(histogram.items())})


def main(args: CapacityArguments) -> dict:
    from trainers.evaluation import load_model_and_processor, load_split

    if not args.model_name_or_path or not args.dataset_name:
        raise SystemExit("--model_name_or_path and --dataset_name are required.")
    model, processor = load_model_and_processor(args.model_name_or_path)
    split = load_split(args.dataset_name, args.dataset_split, args.dataset_config)
    rates = pass_rates(model, processor, question_rows(split), args)
    use_latent = [rate <= args.capacity_threshold for rate in rates]
    for column in ("base_pass_rate", "use_latent"):
        if column in split.column_names:
            split = split.remove_columns(column)
    split = split.add_column("base_pass_rate", rates).add_column("use_latent", use_latent)
    split.save_to_disk(args.output_dir)
    summary = summarize(rates, use_latent, args.capacity_threshold)
    with open(os.path.join(args.output_dir, "capacity_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['use_latent']} of {summary['rows']} rows keep latent supervision "
          f"(base pass rate <= {args.capacity_threshold}); mean pass rate {summary['mean_pass_rate']:.3f}")
    return summary


if __name__ == "__main__":
    from trl import TrlParser

    (capacity_args,) = TrlParser((CapacityArguments,)).parse_args_and_config()
    main(capacity_args)
