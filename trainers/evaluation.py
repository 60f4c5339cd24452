"""Evaluating GAP models: benchmark column mappings, answer extraction, batched generation over a split, and the
`gap eval` stage.

Accuracy and its interval come from the `evaluate` metric module shipped inside this package
(`trainers/metrics/gap_accuracy`, package data), which loads offline, from a wheel as from a checkout.
"""

import os
import re
import string
from dataclasses import asdict, dataclass

import torch

from .dataset_loader import load_split
from .model_loader import load_model
from .outputs import write_json
from .schema import user_question

METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "gap_accuracy")


def _gap_question(row: dict) -> str:
    """GAP rows: a `question` column if the dataset has one, else the text of the first user turn."""
    if row.get("question") is not None:
        return row["question"]
    if "messages" not in row:
        raise KeyError(f"no 'question' column and no 'messages' to take the user turn from; columns are {sorted(row)}.")
    return user_question(row["messages"])

# How the columns of common benchmarks map to ours (`images`, `question`, `answer`, `choices`, `kind`). Each value
# names a source column; `choices` may also be a list of columns (one per option); `kind` is a fixed kind or a
# callable of the row. Our own schema (and the synthetic task) is "gap".
COLUMN_MAPPINGS = {
    # GAP's schema (converted or synthetic rows): the question is the user turn's text unless a `question` column is
    # there.
    "gap": dict(images="images", question=_gap_question, answer="answer", choices="choices", kind=None),
    # MathVista (testmini): `decoded_image`, `query` (question with its hints/choices), `answer`, `choices` (None for
    # free form), `question_type` ("multi_choice" | "free_form"), `answer_type` ("text" | "integer" | "float").
    "mathvista": dict(
        images="decoded_image", question="query", answer="answer", choices="choices",
        kind=lambda row: "choice" if row.get("question_type") == "multi_choice"
        else ("number" if row.get("answer_type") in ("integer", "float") else "text"),
    ),
    # V* Bench: `image`, `text` (the question with its lettered options), `label` (the letter).
    "vstar": dict(images="image", question="text", answer="label", choices=None, kind="choice"),
    # HR-Bench (4K / 8K): `image`, `question`, options in columns `A`-`D`, `answer` (the letter).
    "hrbench": dict(images="image", question="question", answer="answer", choices=["A", "B", "C", "D"], kind="choice"),
    # MME-RealWorld: `image`, `question`, `multi-choice options` (["(A) ...", ...]), `answer` (the letter).
    "mme_realworld": dict(images="image", question="question", answer="answer", choices="multi-choice options",
                          kind="choice"),
}

LETTERS = string.ascii_uppercase


@dataclass
class EvalRow:
    images: list
    question: str
    answer: str
    choices: list[str] | None
    kind: str  # "choice" | "number" | "text"


def standardize_row(row: dict, mapping: str | dict = "gap", index: int | None = None) -> EvalRow:
    """One dataset row in a benchmark's columns -> an `EvalRow`. Errors name the row and the missing column."""
    spec = COLUMN_MAPPINGS[mapping] if isinstance(mapping, str) else mapping
    where = f"row {index}" if index is not None else "row"

    def column(name):
        if name not in row:
            raise KeyError(f"{where}: column {name!r} is missing (mapping {mapping!r}); columns are {sorted(row)}.")
        return row[name]

    images = column(spec["images"])
    images = [images] if not isinstance(images, (list, tuple)) else list(images)
    if not images or any(image is None for image in images):
        raise ValueError(f"{where}: no image in column {spec['images']!r}.")
    try:
        question = spec["question"](row) if callable(spec["question"]) else column(spec["question"])
    except KeyError as error:
        raise KeyError(f"{where}: {error.args[0]}") from None
    question, answer = str(question), str(column(spec["answer"])).strip()
    if not answer:
        raise ValueError(f"{where}: the answer in column {spec['answer']!r} is empty.")
    choices = None
    if isinstance(spec["choices"], list):
        choices = [str(row[c]) for c in spec["choices"] if row.get(c) not in (None, "")]
    elif spec["choices"] and row.get(spec["choices"]):
        choices = [re.sub(r"^\(?[A-Z][\).:]\s*", "", str(c)) for c in row[spec["choices"]]]
    kind = spec["kind"](row) if callable(spec["kind"]) else spec["kind"]
    if kind is None:
        kind = infer_kind(answer, choices)
    if kind == "choice" and choices and answer in choices and answer not in LETTERS[: len(choices)]:
        answer = LETTERS[choices.index(answer)]  # MathVista gives the option text, not its letter
    return EvalRow(images=images, question=question, answer=answer, choices=choices or None, kind=kind)


def infer_kind(answer: str, choices: list[str] | None = None) -> str:
    """"choice" when there are options, "number" when the answer is a number alone, else "text"."""
    if choices:
        return "choice"
    return "number" if re.fullmatch(r"\s*" + _NUMBER.pattern + r"\s*", answer) else "text"


def format_question(row: EvalRow) -> str:
    """The question, with lettered options appended when the benchmark keeps them in a separate column."""
    if not row.choices or re.search(r"\(A\)|\bA[\.:]", row.question):
        return row.question
    options = "\n".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(row.choices))
    return f"{row.question}\n{options}\nAnswer with the option's letter."


# ---- answer extraction ------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_answer_text(generated: str) -> str:
    """The part of a generation that states the answer: after the last "answer:"/"answer is", else all of it."""
    match = list(re.finditer(r"answer(?: is|:)\s*", generated, flags=re.IGNORECASE))
    return generated[match[-1].end():] if match else generated


def normalize_text(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _parse_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def extract_answer(generated: str, kind: str, choices: list[str] | None = None) -> str:
    """The answer a generation gives, normalised for comparison: an option letter, a number or normalised text.

    - `"choice"`: "(B)", "B.", "B)", "answer is B", a lone letter, or the full text of one option -> "B".
    - `"number"`: the last number in the answer part, without thousands separators -> "1234.5" / "12".
    - `"text"`: lower case, no punctuation or articles, single spaces.
    Returns "" when nothing answer-like is found.
    """
    part = final_answer_text(generated).strip()
    if kind == "choice":
        n = len(choices) if choices else 26
        valid = LETTERS[:n]
        lone = re.fullmatch(r"\(?([A-Za-z])\)?\.?", part)
        if lone and lone.group(1).upper() in valid:
            return lone.group(1).upper()
        for pattern in (r"\(([A-Z])\)", r"\b([A-Z])[\.\):](?:\s|$)", r"^\s*([A-Z])\s*$", r"\b([A-Z])\b"):
            for match in re.finditer(pattern, part):
                if match.group(1) in valid:
                    return match.group(1)
        if choices:
            normalized = normalize_text(part)
            hits = [i for i, c in enumerate(choices) if normalize_text(c) and normalize_text(c) in normalized]
            if len(hits) == 1:
                return valid[hits[0]]
        return ""
    if kind == "number":
        value = _parse_number(part)
        if value is None:
            return ""
        return str(int(value)) if value == int(value) else repr(round(value, 6))
    return normalize_text(part)


def reference_answer(row: EvalRow) -> str:
    """The gold answer in the same normal form as `extract_answer`."""
    if row.kind == "choice":
        return row.answer.strip().strip("()").upper()[:1]
    return extract_answer(row.answer, row.kind, row.choices)


def load_eval_rows(args) -> list[EvalRow]:
    """The split named by `args`, limited and mapped to `EvalRow`s."""
    if not args.model_name_or_path or not args.dataset_name:
        raise SystemExit("--model_name_or_path and --dataset_name are required.")
    split = load_split(args.dataset_name, args.dataset_split, args.dataset_config)
    if args.limit:
        split = split.select(range(min(args.limit, len(split))))
    return [standardize_row(row, args.column_mapping, index=i) for i, row in enumerate(split)]


# ---- generation over a split ------------------------------------------------------------------------------------
def build_prompt(processor, row: EvalRow) -> str:
    content = [{"type": "image"} for _ in row.images] + [{"type": "text", "text": format_question(row)}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def generate_answers(model, processor, rows: list[EvalRow], batch_size: int = 8, progress: bool = True,
                     description: str = "generating", **generate_kwargs) -> list[dict]:
    """Greedy (by default) generation for each row; returns one record per row with the generated text (special
    tokens dropped), the number of latent spans, the extracted and the gold answer, and whether they match."""
    from transformers.utils.logging import tqdm

    processor.tokenizer.padding_side = "left"
    generate_kwargs.setdefault("do_sample", False)
    start_id = getattr(model.config, "latent_start_token_id", None)
    device = next(model.parameters()).device
    records = []
    batches = range(0, len(rows), batch_size)
    for begin in tqdm(batches, desc=description, disable=not progress):
        chunk = rows[begin : begin + batch_size]
        inputs = processor(
            images=[image.convert("RGB") for row in chunk for image in row.images],
            text=[build_prompt(processor, row) for row in chunk], padding=True, return_tensors="pt",
        ).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        sequences = model.generate(**inputs, **generate_kwargs)
        sequences = getattr(sequences, "sequences", sequences)
        new = sequences[:, inputs["input_ids"].shape[1]:]
        texts = processor.batch_decode(new, skip_special_tokens=True)
        for row, text, tokens in zip(chunk, texts, new.tolist()):
            prediction = extract_answer(text, row.kind, row.choices)
            gold = reference_answer(row)
            records.append(dict(
                question=row.question, generated=text, prediction=prediction, answer=gold, kind=row.kind,
                correct=bool(prediction) and prediction == gold,
                latent_spans=tokens.count(start_id) if start_id is not None else 0,
            ))
    return records


def evaluate_rows(model, processor, rows: list[EvalRow], batch_size: int = 8, max_new_tokens: int = 64,
                  latent_feedback: str | None = None, latent_intervention: str | None = None,
                  latent_intervention_seed: int = 0, cache_implementation: str | None = None,
                  progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate, extract, score: `(results, records)`. Results: accuracy with its 95 % Wilson interval (from the
    metric module at `METRIC_PATH`), correct, total, mean latent spans per row. Latent options apply to GAP models
    only (a stock model takes none)."""
    import evaluate

    kwargs = dict(max_new_tokens=max_new_tokens)
    if getattr(model.config, "latent_start_token_id", None) is not None:
        kwargs.update(latent_intervention=latent_intervention, latent_intervention_seed=latent_intervention_seed)
        if latent_feedback:
            kwargs["latent_feedback"] = latent_feedback
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    records = generate_answers(model, processor, rows, batch_size=batch_size, progress=progress, **kwargs)
    metric = evaluate.load(METRIC_PATH)
    results = metric.compute(predictions=[r["prediction"] for r in records], references=[r["answer"] for r in records])
    results["mean_latent_spans"] = sum(r["latent_spans"] for r in records) / max(len(records), 1)
    return results, records


def load_eval_model(args):
    """The model and processor of an evaluation stage (a stock Qwen2.5-VL is evaluated as it is, a baseline)."""
    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is required.")
    model, processor = load_model(args.model_name_or_path, stock="keep", trust_remote_code=args.trust_remote_code,
                                  allow_pickle_weights=args.allow_pickle_weights)
    return model.eval(), processor


def run_evaluation(args) -> dict:
    """`gap eval` (`args`: a `trainers.arguments.EvalArguments`): writes `predictions.jsonl` (one record per row:
    generated text, extracted and gold answer, correct, latent spans) and `results.json` (accuracy with a 95 % Wilson
    interval, strict JSON) to `args.output_dir`; returns the results."""
    import json

    model, processor = load_eval_model(args)
    rows = load_eval_rows(args)
    results, records = evaluate_rows(
        model, processor, rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        latent_feedback=args.latent_feedback, latent_intervention=args.latent_intervention,
        latent_intervention_seed=args.latent_intervention_seed, cache_implementation=args.cache_implementation,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "predictions.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    summary = dict(results, arguments=asdict(args))
    write_json(os.path.join(args.output_dir, "results.json"), summary)
    print(f"accuracy {results['accuracy']:.3f} (95% CI {results['ci_low']:.3f}-{results['ci_high']:.3f}, "
          f"{results['correct']}/{results['total']}); written to {args.output_dir}")
    return summary


__all__ = [
    "COLUMN_MAPPINGS",
    "EvalRow",
    "METRIC_PATH",
    "build_prompt",
    "evaluate_rows",
    "extract_answer",
    "format_question",
    "infer_kind",
    "generate_answers",
    "load_eval_rows",
    "load_eval_model",
    "normalize_text",
    "reference_answer",
    "run_evaluation",
    "standardize_row",
]
