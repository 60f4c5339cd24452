"""Convert Monet, Mirage or LVR latent-reasoning data to GAP's dataset schema, saved with `datasets`.

    gap convert --format monet --input Monet-SFT-125K/train.json \\
        --image-root Monet-SFT-125K --output data/monet-gap
    gap convert --format mirage --input mirage/train.jsonl \\
        --image-root mirage --output data/mirage-gap
    gap convert --format lvr --input lvr/train.json --image-root lvr/images --output data/lvr-gap

Add `--strict` to stop at the first row that cannot be converted (the error names the row and the reason),
`--require-answer` to skip rows whose answer cannot be found, `--max-rows N` for a quick try, `--overwrite` to
replace an existing output. `--image-root` defaults to the input file's folder; absolute image paths are used as
they are. (`--image_root` and the other underscore spellings work too.)

What each source becomes (one row per source row; `datasets.load_from_disk(OUTPUT)` reads it back):

- `images`: the question image(s), `List(Image)`, the source files' bytes as they are (no re-encoding).
- `messages`: `[{"role", "content"}]`; every turn's content is a list of parts, `{"type": "image", "text": None}` for
  each question image where the source puts it and `{"type": "text", "text": ...}` (TRL's conversational vision
  format; Arrow needs one content type for all turns). Each latent span is the literal `<|latent|>` in the
  assistant text, one text part per assistant turn.
- `aux_images`: `List(Image)`, one per `<|latent|>` marker, in order. Monet: the assistant's helper images, paired
  in order with its `<abs_vis_token></abs_vis_token>` spans, as Monet's collator pairs them. Mirage: `image_output`
  (where `text_output` has no `<output_image>`, the spans open the assistant turn, where Mirage's chat template puts
  the helper image). LVR: the crop of each box from the (first) question image, pixels
  `floor(x1 * W), floor(y1 * H), ceil(x2 * W), ceil(y2 * H)`, saved as PNG.
- `answer`: the source's answer: a row field `answer` (Monet: in `metadata`) if present, else the last
  `<answer>...</answer>`, else the last `\\boxed{...}` of the assistant text; `""` when the source has none (those rows
  are counted in the report; `--require-answer` skips them instead).
- `source_index`: the row's index in the input (0-based; JSONL: the index among non-empty lines).

Text derived from the visual evidence stays text: Monet's `<observation>...</observation>` content is kept, tags
removed (`--keep-observation-tags` keeps them), right after the marker, as the parser description. The assistant
text is otherwise kept as the source has it (LVR's `<answer>` tags, Monet's `\\boxed{}`).

Rows that cannot be converted are skipped with one reason each (see `SKIP_REASONS`); the counts, the row indices and
the first details per reason are printed and written to `OUTPUT/conversion_report.json` (next to the dataset
files; `load_from_disk` ignores it).
"""

import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image as PILImage

from .arguments import SOURCE_FORMATS as FORMATS
from .schema import LATENT_MARKER, gap_features

REPORT_NAME = "conversion_report.json"
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses images more elongated than this

SKIP_REASONS = {
    "malformed_json": "the JSONL line does not parse as JSON",
    "malformed_row": "the row lacks a field the format needs, or a field has the wrong type or an unknown role",
    "no_assistant_turn": "the row has no assistant (gpt) turn",
    "missing_image": "an image file does not exist",
    "unreadable_image": "an image file cannot be decoded",
    "bad_image_shape": f"an image (or box crop) is empty or more elongated than {MAX_ASPECT_RATIO}:1",
    "image_placeholder_mismatch": "the number of <image> placeholders differs from the number of question images",
    "marker_aux_mismatch": "the number of latent-span markers differs from the number of helper images / boxes",
    "bad_box": "an LVR box is not 4 numbers with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1",
    "reserved_marker": f"the source text already contains GAP's marker {LATENT_MARKER}",
    "no_answer": "no answer found (only with --require-answer)",
}

# Monet: a span is `<abs_vis_token></abs_vis_token>` (pads inside tolerated) followed by a helper-image item.
MONET_SPAN = re.compile(r"<abs_vis_token>(?:\s*<abs_vis_token_pad>)*\s*</abs_vis_token>")
MONET_STRAY = re.compile(r"</?abs_vis_token(?:_pad)?>")
OBSERVATION_TAGS = re.compile(r"</?observation>")
MIRAGE_SPAN = "<output_image>"
LVR_SPAN = "<lvr>"
IMAGE_PLACEHOLDER = "<image>"
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class ConversionError(ValueError):
    """A row that cannot be converted, raised under `strict`; the message names the row and the reason."""

    def __init__(self, index: int, reason: str, detail: str):
        self.index, self.reason, self.detail = index, reason, detail
        super().__init__(f"Row {index}: {reason}: {detail}")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class _Malformed:
    """A JSONL line that does not parse."""

    line: int
    error: str


# ---------------------------------------------------------------------------------------------------------------------
# Reading the input
# ---------------------------------------------------------------------------------------------------------------------


def load_rows(path: str, max_rows: int | None = None) -> list:
    """Rows of a JSON list or a JSONL file. A JSONL line that does not parse becomes a `_Malformed` placeholder
    (converted to a `malformed_json` skip); a JSON list that does not parse is an error, as its rows cannot be told
    apart."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} starts like a JSON list but does not parse: {error}") from error
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                rows.append(_Malformed(number, str(error)))
    return rows[:max_rows] if max_rows is not None else rows


class _ImageReader:
    """Reads images under a root, checks that they decode, caches them within one row."""

    def __init__(self, image_root: str | None):
        self.root = image_root or ""
        self.cache: dict[str, tuple[bytes, PILImage.Image]] = {}

    def resolve(self, reference: Any) -> str:
        if not isinstance(reference, str) or not reference:
            raise _Skip("malformed_row", f"image reference {reference!r} is not a path")
        if reference.startswith("file://"):
            reference = reference[len("file://") :]
        return reference if os.path.isabs(reference) else os.path.join(self.root, reference)

    def read(self, reference: Any) -> tuple[bytes, PILImage.Image]:
        path = self.resolve(reference)
        if path not in self.cache:
            if not os.path.isfile(path):
                raise _Skip("missing_image", f"no file {path}")
            with open(path, "rb") as handle:
                data = handle.read()
            try:
                image = PILImage.open(io.BytesIO(data))
                image.load()
            except Exception as error:  # PIL raises many kinds
                raise _Skip("unreadable_image", f"{path}: {type(error).__name__}: {error}") from None
            _check_shape(image.size, path)
            self.cache[path] = (data, image)
        return self.cache[path]

    def encoded(self, reference: Any) -> dict:
        data, _ = self.read(reference)
        return {"bytes": data, "path": None}


def _check_shape(size: tuple[int, int], what: str):
    width, height = size
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise _Skip("bad_image_shape", f"{what} is {width}x{height}")


def _png(image: PILImage.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


# ---------------------------------------------------------------------------------------------------------------------
# Shared text helpers
# ---------------------------------------------------------------------------------------------------------------------


def extract_answer(text: str) -> str:
    """The last `<answer>...</answer>`, else the last `\\boxed{...}` (braces balanced), stripped; `""` if neither."""
    tagged = ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    start = text.rfind("\\boxed{")
    if start < 0:
        return ""
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            if depth == 0:
                return text[begin:position].strip()
            depth -= 1
    return ""


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Skip("malformed_row", f"{what} is {type(value).__name__}, not a string")
    if LATENT_MARKER in value:
        raise _Skip("reserved_marker", f"{what} contains {LATENT_MARKER}")
    return value


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def _image_part() -> dict:
    return {"type": "image", "text": None}


def _interleave(text: str, references: list, reader: _ImageReader, images: list, what: str) -> list[dict]:
    """User content from text with `<image>` placeholders: image parts where the placeholders are (all images first
    when the text has none), text pieces stripped, empty pieces dropped. Appends the images to `images`."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    placeholders = len(pieces) - 1
    if placeholders == 0 and references:
        pieces = [""] * len(references) + [text]
    elif placeholders != len(references):
        raise _Skip(
            "image_placeholder_mismatch",
            f"{what} has {placeholders} {IMAGE_PLACEHOLDER} for {len(references)} image(s)",
        )
    content = []
    for position, piece in enumerate(pieces):
        if piece.strip():
            content.append(_text_part(piece.strip()))
        if position < len(references):
            images.append(reader.encoded(references[position]))
            content.append(_image_part())
    return content


def _as_list(value: Any, what: str) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise _Skip("malformed_row", f"{what} is {type(value).__name__}, not a path or a list of paths")


def _given_answer(source: Any) -> str | None:
    if isinstance(source, dict):
        for key in ("answer", "gt_answer", "gt_answer_text"):
            if isinstance(source.get(key), str) and source[key].strip():
                return source[key].strip()
    return None


def _record(images, messages, aux_images, answer) -> dict:
    return {"images": images, "messages": messages, "aux_images": aux_images, "answer": answer}


# ---------------------------------------------------------------------------------------------------------------------
# The three formats: one row in, one record out (or _Skip)
# ---------------------------------------------------------------------------------------------------------------------


def _monet_row(row: Any, reader: _ImageReader, keep_observation_tags: bool = False) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("data"), list):
        raise _Skip("malformed_row", "a Monet row is {'data': [system, user, assistant], 'metadata': {...}}")
    images, aux_images, messages, assistant_texts, spans = [], [], [], [], 0
    for turn_index, turn in enumerate(row["data"]):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise _Skip("malformed_row", f"turn {turn_index} is not a system/user/assistant message")
        role, content = turn["role"], turn.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise _Skip("malformed_row", f"turn {turn_index} ({role}) has no content list")
        if role != "assistant":
            parts = []
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "image":
                    images.append(reader.encoded(_monet_image(item, turn_index)))
                    parts.append(_image_part())
                elif kind == "text":
                    text = _text(item.get("text"), f"turn {turn_index} ({role}) text")
                    if MONET_STRAY.search(text):
                        raise _Skip("marker_aux_mismatch", f"turn {turn_index} ({role}) holds a Monet latent token")
                    if text.strip():
                        parts.append(_text_part(text))
                else:
                    raise _Skip("malformed_row", f"turn {turn_index} ({role}) has an item of type {kind!r}")
            messages.append({"role": role, "content": parts})
            continue
        text = ""
        for item_index, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                piece = _text(item.get("text"), f"turn {turn_index} (assistant) text")
                spans += len(MONET_SPAN.findall(piece))
                piece = MONET_SPAN.sub(LATENT_MARKER, piece)
                if MONET_STRAY.search(piece):
                    raise _Skip("marker_aux_mismatch", f"turn {turn_index} has an unpaired Monet latent token")
                if not keep_observation_tags:
                    piece = OBSERVATION_TAGS.sub("", piece)
                text += piece
            elif kind == "image":
                # Monet's own check: a helper image right after a text item needs the span token in that text.
                previous = content[item_index - 1] if item_index else None
                if (
                    isinstance(previous, dict) and previous.get("type") == "text"
                    and not MONET_SPAN.search(str(previous.get("text")))
                ):
                    raise _Skip(
                        "marker_aux_mismatch",
                        f"turn {turn_index}: helper image (item {item_index}) follows a text item without "
                        "<abs_vis_token></abs_vis_token>",
                    )
                aux_images.append(reader.encoded(_monet_image(item, turn_index)))
            else:
                raise _Skip("malformed_row", f"turn {turn_index} (assistant) has an item of type {kind!r}")
        text = text.strip()
        messages.append({"role": "assistant", "content": [_text_part(text)]})
        assistant_texts.append(text)
    if not assistant_texts:
        raise _Skip("no_assistant_turn", "no assistant message in 'data'")
    if spans != len(aux_images):  # spans and helper images pair up in order, as in Monet's collator
        raise _Skip(
            "marker_aux_mismatch", f"{spans} <abs_vis_token></abs_vis_token> for {len(aux_images)} helper image(s)"
        )
    answer = _given_answer(row) or _given_answer(row.get("metadata")) or extract_answer(assistant_texts[-1])
    return _record(images, messages, aux_images, answer)


def _monet_image(item: dict, turn_index: int) -> Any:
    for key in ("image", "image_file_name", "path"):
        if item.get(key):
            return item[key]
    raise _Skip("malformed_row", f"turn {turn_index} has an image item without a path")


def _mirage_row(row: Any, reader: _ImageReader) -> dict:
    if not isinstance(row, dict) or "text_input" not in row or "text_output" not in row:
        raise _Skip("malformed_row", "a Mirage row is {'text_input', 'text_output', 'image_input', 'image_output'}")
    question = _text(row["text_input"], "text_input")
    output = _text(row["text_output"], "text_output")
    if not output.strip():
        raise _Skip("no_assistant_turn", "text_output is empty")
    images = []
    user = _interleave(question, _as_list(row.get("image_input"), "image_input"), reader, images, "text_input")
    if MIRAGE_SPAN in question:
        raise _Skip("marker_aux_mismatch", f"text_input holds {MIRAGE_SPAN}; spans belong to the answer")
    helpers = _as_list(row.get("image_output"), "image_output")
    spans = output.count(MIRAGE_SPAN)
    if spans == 0 and helpers:  # Mirage's template then leaves the helper image(s) opening the assistant turn
        output, spans = MIRAGE_SPAN * len(helpers) + output, len(helpers)
    if spans != len(helpers):
        raise _Skip("marker_aux_mismatch", f"text_output has {spans} {MIRAGE_SPAN} for {len(helpers)} image_output(s)")
    aux_images = [reader.encoded(helper) for helper in helpers]
    text = output.replace(MIRAGE_SPAN, LATENT_MARKER).strip()
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [_text_part(text)]}]
    return _record(images, messages, aux_images, _given_answer(row) or extract_answer(text))


LVR_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _lvr_row(row: Any, reader: _ImageReader) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise _Skip("malformed_row", "an LVR row is {'image': [...], 'conversations': [...], 'bboxes': [...]}")
    references = _as_list(row.get("image"), "image")
    turns = []
    for turn_index, turn in enumerate(row["conversations"]):
        if not isinstance(turn, dict) or turn.get("from") not in LVR_ROLES:
            raise _Skip("malformed_row", f"conversation turn {turn_index} has no known 'from'")
        turns.append((LVR_ROLES[turn["from"]], _text(turn.get("value"), f"conversation turn {turn_index} value")))
    if not any(role == "assistant" for role, _ in turns):
        raise _Skip("no_assistant_turn", "no gpt turn in 'conversations'")
    boxes = row.get("bboxes") or []
    if not isinstance(boxes, list):
        raise _Skip("malformed_row", "'bboxes' is not a list")
    if len(boxes) == 4 and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [boxes]  # one box written flat
    if any(LVR_SPAN in value for role, value in turns if role != "assistant"):
        raise _Skip("marker_aux_mismatch", f"a human turn holds {LVR_SPAN}; spans belong to the gpt turns")
    spans = sum(value.count(LVR_SPAN) for role, value in turns if role == "assistant")
    if spans != len(boxes):
        raise _Skip("marker_aux_mismatch", f"the gpt turns have {spans} {LVR_SPAN} for {len(boxes)} box(es)")
    for box_index, box in enumerate(boxes):
        if not (
            isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        ):
            raise _Skip("bad_box", f"box {box_index} is {box!r}, not 4 numbers")
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
            raise _Skip("bad_box", f"box {box_index} {list(box)} is empty or outside [0, 1]")
    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for role, value in turns)
    if placeholders not in (0, len(references)):
        raise _Skip("image_placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} for {len(references)} image(s)")
    if boxes and not references:
        raise _Skip("marker_aux_mismatch", "boxes but no question image to crop them from")

    images, messages, pending = [], [], list(references)
    for position, (role, value) in enumerate(turns):
        if role == "assistant":
            messages.append({"role": role, "content": [_text_part(value.replace(LVR_SPAN, LATENT_MARKER).strip())]})
            continue
        count = value.count(IMAGE_PLACEHOLDER)
        if placeholders == 0 and role == "user" and pending:  # no placeholders: all images open the first user turn
            count = len(pending)
            value = IMAGE_PLACEHOLDER * count + value
        here, pending = pending[:count], pending[count:]
        messages.append({"role": role, "content": _interleave(value, here, reader, images, f"turn {position}")})
    aux_images = []
    if boxes:
        _, source = reader.read(references[0])  # LVR rows hold one image; boxes refer to the first
        source = source.convert("RGB")
        width, height = source.size
        for x1, y1, x2, y2 in boxes:
            pixels = lvr_box_pixels((x1, y1, x2, y2), (width, height))
            _check_shape((pixels[2] - pixels[0], pixels[3] - pixels[1]), f"crop of box {[x1, y1, x2, y2]}")
            aux_images.append(_png(source.crop(pixels)))
    answers = [value for role, value in turns if role == "assistant"]
    return _record(images, messages, aux_images, _given_answer(row) or extract_answer(answers[-1]))


def lvr_box_pixels(box, size) -> tuple[int, int, int, int]:
    """The pixel rectangle of a normalized box: outward-rounded, clipped to the image."""
    (x1, y1, x2, y2), (width, height) = box, size
    return (
        max(0, math.floor(x1 * width)), max(0, math.floor(y1 * height)),
        min(width, math.ceil(x2 * width)), min(height, math.ceil(y2 * height)),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------


def iter_convert(
    format: str,
    rows: Iterable,
    image_root: str | None = None,
    *,
    strict: bool = False,
    require_answer: bool = False,
    keep_observation_tags: bool = False,
) -> Iterator[tuple[int, dict | None, dict | None]]:
    """Yield `(index, record, None)` for each converted row and `(index, None, skip)` for each skipped one, where
    `skip = {"row", "reason", "detail"}`. With `strict`, the first skip raises `ConversionError` instead."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    convert = {"monet": _monet_row, "mirage": _mirage_row, "lvr": _lvr_row}[format]
    options = {"keep_observation_tags": keep_observation_tags} if format == "monet" else {}
    for index, row in enumerate(rows):
        try:
            if isinstance(row, _Malformed):
                raise _Skip("malformed_json", f"line {row.line}: {row.error}")
            record = convert(row, _ImageReader(image_root), **options)
            if require_answer and not record["answer"]:
                raise _Skip("no_answer", "no answer field, <answer> tag or \\boxed{}")
            record["source_index"] = index
        except _Skip as skip:
            if strict:
                raise ConversionError(index, skip.reason, skip.detail) from None
            yield index, None, {"row": index, "reason": skip.reason, "detail": skip.detail}
            continue
        yield index, record, None


def _convert_all(format, rows, image_root=None, **options) -> tuple[list[dict], list[dict]]:
    records, skipped = [], []
    for _, record, skip in iter_convert(format, rows, image_root, **options):
        (records if record is not None else skipped).append(record if record is not None else skip)
    return records, skipped


def convert_monet(rows, image_root=None, **options) -> tuple[list[dict], list[dict]]:
    """Monet rows (`{"data": [system, user, assistant], "metadata"}`) -> (records, skipped). Options: `strict`,
    `require_answer`, `keep_observation_tags`."""
    return _convert_all("monet", rows, image_root, **options)


def convert_mirage(rows, image_root=None, **options) -> tuple[list[dict], list[dict]]:
    """Mirage rows (`{"text_input", "text_output", "image_input", "image_output"}`) -> (records, skipped)."""
    return _convert_all("mirage", rows, image_root, **options)


def convert_lvr(rows, image_root=None, **options) -> tuple[list[dict], list[dict]]:
    """LVR rows (`{"image", "conversations", "bboxes"}`) -> (records, skipped)."""
    return _convert_all("lvr", rows, image_root, **options)


def records_to_dataset(records: list[dict]):
    """An in-memory `datasets.Dataset` of converted records (what `main` writes, for small inputs and tests)."""
    from datasets import Dataset

    return Dataset.from_list(records, features=gap_features())


def summarize(format: str, input_path: str, output: str, rows_in: int, converted: int, skipped: list[dict],
              no_answer: list[int], max_details: int = 50) -> dict:
    reasons: dict[str, dict] = {}
    for skip in skipped:
        entry = reasons.setdefault(skip["reason"], {"count": 0, "rows": [], "details": {}})
        entry["count"] += 1
        entry["rows"].append(skip["row"])
        if len(entry["details"]) < max_details:
            entry["details"][str(skip["row"])] = skip["detail"]
    return {
        "format": format,
        "input": os.path.abspath(input_path),
        "output": os.path.abspath(output),
        "rows_in": rows_in,
        "rows_converted": converted,
        "rows_skipped": len(skipped),
        "skipped": dict(sorted(reasons.items())),
        "rows_without_answer": {"count": len(no_answer), "rows": no_answer},
    }


def convert_dataset(args) -> dict:
    """`gap convert` (`args`: a `trainers.arguments.ConvertDatasetArguments`): convert `args.input`, save the dataset to `args.output`, write and return the report."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    if os.path.exists(args.output) and os.listdir(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} exists and is not empty (pass --overwrite to replace it)")
    image_root = args.image_root if args.image_root is not None else os.path.dirname(os.path.abspath(args.input))
    rows = load_rows(args.input, args.max_rows)
    features = gap_features()
    parent = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".convert-", dir=parent)  # same disk as the output
    skipped, no_answer, converted = [], [], 0
    try:
        shard = os.path.join(scratch, "rows.arrow")
        with ArrowWriter(features=features, path=shard, writer_batch_size=100) as writer:
            progress = tqdm(
                iter_convert(args.format, rows, image_root, strict=args.strict, require_answer=args.require_answer,
                             keep_observation_tags=args.keep_observation_tags),
                total=len(rows), desc=f"converting {args.format}", unit="row",
            )
            for index, record, skip in progress:
                if record is None:
                    skipped.append(skip)
                    progress.set_postfix(skipped=len(skipped), refresh=False)
                    continue
                if not record["answer"]:
                    no_answer.append(index)
                writer.write(features.encode_example(record))
                converted += 1
            writer.finalize()
        dataset = Dataset.from_file(shard)
        if os.path.exists(args.output):
            shutil.rmtree(args.output)
        dataset.save_to_disk(args.output)
        del dataset
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = summarize(args.format, args.input, args.output, len(rows), converted, skipped, no_answer)
    with open(os.path.join(args.output, REPORT_NAME), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"converted {converted} of {len(rows)} {args.format} rows into {args.output}")
    for reason, entry in report["skipped"].items():
        print(f"  skipped {entry['count']:>7}  {reason}: {SKIP_REASONS[reason]}")
    if no_answer:
        print(f"  kept {len(no_answer)} row(s) without an answer (answer ''); --require-answer skips them")
    print(f"report: {os.path.join(args.output, REPORT_NAME)}")
    return report


__all__ = [
    "FORMATS", "SKIP_REASONS", "ConversionError", "convert_dataset", "convert_lvr", "convert_mirage",
    "convert_monet", "extract_answer", "iter_convert", "load_rows", "lvr_box_pixels", "records_to_dataset",
]
