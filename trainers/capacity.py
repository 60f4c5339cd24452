"""Capacity-level alignment: measure where the base model struggles, and keep latent supervision only there
(`gap assign-capacity`).

For each training row (GAP's schema), the *base* model answers the user turn `num_samples` times (sampling);
`base_pass_rate` is the fraction of answers that match `answer` (the extraction of `trainers.evaluation`), and
`use_latent = base_pass_rate <= capacity_threshold`. Rows the base already solves train as plain text; the others
keep their latent span. Writes the dataset with the two columns (`save_to_disk`) and `capacity_summary.json`.
"""

import json
import os
from collections import Counter

from .dataset_loader import load_split
from .evaluation import EvalRow, generate_answers, infer_kind
from .model_loader import load_model
from .schema import CAPACITY_COLUMNS, user_question


def question_rows(split) -> list[EvalRow]:
    """EvalRows from training rows: the user turn's text as the question, the `answer` column as gold."""
    rows = []
    for index, row in enumerate(split):
        question = user_question(row["messages"])
        if not question:
            raise ValueError(f"row {index}: no user turn with text in `messages`; capacity needs the question.")
        answer = str(row.get("answer") or "").strip()
        if not answer:
            raise ValueError(f"row {index}: `answer` is empty; capacity assignment needs a gold answer per row.")
        rows.append(EvalRow(images=row["images"], question=question, answer=answer, choices=None,
                            kind=infer_kind(answer)))
    return rows


def pass_rates(model, processor, rows, num_samples: int = 4, temperature: float = 1.0, max_new_tokens: int = 64,
               batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[float]:
    """The fraction of `num_samples` sampled answers that are right, per row (a GAP model answers without its
    latent spans: the base's own ability)."""
    import torch

    correct = [0] * len(rows)
    generate_kwargs = dict(do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens)
    if getattr(model.config, "latent_start_token_id", None) is not None:
        generate_kwargs["latent_intervention"] = "drop"
    for sample in range(num_samples):
        torch.manual_seed(seed + sample)
        records = generate_answers(model, processor, rows, batch_size=batch_size, progress=progress,
                                   description=f"capacity: sample {sample + 1} of {num_samples}", **generate_kwargs)
        correct = [c + r["correct"] for c, r in zip(correct, records)]
    return [c / num_samples for c in correct]


def summarize(rates: list[float], use_latent: list[bool], threshold: float) -> dict:
    histogram = Counter(round(r, 3) for r in rates)
    return dict(rows=len(rates), use_latent=sum(use_latent), plain_text=len(use_latent) - sum(use_latent),
                capacity_threshold=threshold, mean_pass_rate=sum(rates) / max(len(rates), 1),
                pass_rate_histogram={str(k): v for k, v in sorted(histogram.items())})


def assign_capacity(args) -> dict:
    """`gap assign-capacity` (`args`: a `trainers.arguments.CapacityArguments`): returns the summary."""
    if not args.model_name_or_path or not args.dataset_name:
        raise ValueError("--model_name_or_path and --dataset_name are required.")
    model, processor = load_model(args.model_name_or_path, stock="keep", trust_remote_code=args.trust_remote_code,
                                  allow_pickle_weights=args.allow_pickle_weights)
    split = load_split(args.dataset_name, args.dataset_split, args.dataset_config)
    print(f"capacity: {len(split)} rows x {args.num_samples} sampled answers from {args.model_name_or_path}")
    rates = pass_rates(model, processor, question_rows(split), num_samples=args.num_samples,
                       temperature=args.temperature, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       seed=args.seed)
    use_latent = [rate <= args.capacity_threshold for rate in rates]
    split = split.remove_columns([c for c in CAPACITY_COLUMNS if c in split.column_names])
    split = split.add_column("base_pass_rate", rates).add_column("use_latent", use_latent)
    split.save_to_disk(args.output_dir)
    summary = summarize(rates, use_latent, args.capacity_threshold)
    with open(os.path.join(args.output_dir, "capacity_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['use_latent']} of {summary['rows']} rows keep latent supervision "
          f"(base pass rate <= {args.capacity_threshold}); mean pass rate {summary['mean_pass_rate']:.3f}")
    return summary


__all__ = ["assign_capacity", "pass_rates", "question_rows", "summarize"]
