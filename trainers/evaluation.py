"""Evaluating GAP models: benchmark column mappings, answer extraction and batched generation over a split.

Used by `recipes/evaluate.py`, `recipes/probe.py` and the demo. Accuracy and its interval come from the `evaluate`
metric module kept in this repository (`recipes/metrics/gap_accuracy`), which loads offline.
"""

import os
import re
import string
from dataclasses import dataclass, field

import torch

METRIC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "metrics", "gap_accuracy")

# How the columns of common benchmarks map to ours (`images`, `question`, `answer`, `choices`, `kind`). Each value
# names a source column; `choices` may also be a list of columns (one per option); `kind` is a fixed kind or a
# callable of the row. Our own schema (and the synthetic task) is "gap".
COLUMN_MAPPINGS = {
    "gap": dict(images="images", question="question", answer="answer", choices="choices", kind=None),
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
    question, answer = str(column(spec["question"])), str(column(spec["answer"])).strip()
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


@dataclass
class EvalArguments:
    """Arguments of `recipes/evaluate.py` and `recipes/probe.py` (which runs every intervention itself)."""

    model_name_or_path: str = field(default=None, metadata={"help": "GAP checkpoint (directory or Hub repo id)."})
    dataset_name: str = field(default=None, metadata={"help": "A `save_to_disk` directory or a Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="test", metadata={"help": "Split to evaluate."})
    column_mapping: str = field(default="gap", metadata={"help": "gap | mathvista | vstar | hrbench | mme_realworld"})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    batch_size: int = field(default=8, metadata={"help": "Rows per generate call."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generated positions per row (latent slots count)."})
    latent_feedback: str | None = field(default=None, metadata={"help": "Override: pca | ema_norm | raw."})
    latent_intervention: str | None = field(
        default=None, metadata={"help": "Probe: zero | noise | shuffle | mean | drop (default: none)."})
    latent_intervention_seed: int = field(default=0, metadata={"help": "Seed of noise / shuffle."})
    cache_implementation: str | None = field(default=None, metadata={"help": "'static' for the compiled path."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where predictions and results go."})
    trust_remote_code: bool = field(default=True, metadata={"help": "Load the checkpoint's own code."})


def load_eval_rows(args: EvalArguments) -> list[EvalRow]:
    """The split named by `args`, limited and mapped to `EvalRow`s."""
    if not args.model_name_or_path or not args.dataset_name:
        raise SystemExit("--model_name_or_path and --dataset_name are required.")
    split = load_split(args.dataset_name, args.dataset_split, args.dataset_config)
    if args.limit:
        split = split.select(range(min(args.limit, len(split))))
    return [standardize_row(row, args.column_mapping, index=i) for i, row in enumerate(split)]


# ---- loading -----------------------------------------------------------------------------------------------------
def load_model_and_processor(model_name_or_path: str, dtype="auto", device: str | None = None,
                             trust_remote_code: bool = True):
    """A GAP checkpoint (or a stock Qwen2.5-VL) and its processor, from a directory or a Hub repo id.

    The processor falls back to `GapQwen2_5VLProcessor.from_stock_pretrained` where `AutoProcessor` cannot build the
    stock one (no torchvision)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=dtype,
                                                        trust_remote_code=trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, TypeError):
        from modeling_gap import GapQwen2_5VLProcessor

        processor = GapQwen2_5VLProcessor.from_stock_pretrained(model_name_or_path)
    if device:
        model.to(device)
    return model.eval(), processor


def load_split(dataset_name: str, split: str = "test", config: str | None = None):
    """A split saved with `save_to_disk` (a `Dataset` or a `DatasetDict`), or one from the Hub."""
    import datasets

    if os.path.isdir(dataset_name):
        loaded = datasets.load_from_disk(dataset_name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"{dataset_name} has splits {list(loaded)}; no {split!r}.")
            return loaded[split]
        return loaded
    return datasets.load_dataset(dataset_name, config, split=split)


# ---- generation over a split ------------------------------------------------------------------------------------
def build_prompt(processor, row: EvalRow) -> str:
    content = [{"type": "image"} for _ in row.images] + [{"type": "text", "text": format_question(row)}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def generate_answers(model, processor, rows: list[EvalRow], batch_size: int = 8, progress: bool = True,
                     **generate_kwargs) -> list[dict]:
    """Greedy (by default) generation for each row; returns one record per row with the generated text (special
    tokens dropped), the number of latent spans, the extracted and the gold answer, and whether they match."""
    from tqdm.auto import tqdm

    processor.tokenizer.padding_side = "left"
    generate_kwargs.setdefault("do_sample", False)
    start_id = getattr(model.config, "latent_start_token_id", None)
    device = next(model.parameters()).device
    records = []
    batches = range(0, len(rows), batch_size)
    for begin in tqdm(batches, desc="generating", disable=not progress):
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


__all__ = [
    "COLUMN_MAPPINGS",
    "EvalArguments",
    "EvalRow",
    "METRIC_PATH",
    "build_prompt",
    "evaluate_rows",
    "extract_answer",
    "format_question",
    "infer_kind",
    "generate_answers",
    "load_eval_rows",
    "load_model_and_processor",
    "load_split",
    "normalize_text",
    "reference_answer",
    "standardize_row",
]
