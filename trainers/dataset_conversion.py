"""Convert Monet, Mirage or LVR latent-reasoning data to GAP's dataset schema, saved with `datasets`.

    gap convert --format monet --input Monet-SFT-125K/train.json \\
        --image-root Monet-SFT-125K --output data/monet-gap
    gap convert --format mirage --input mirage/train.jsonl \\
        --image-root mirage --output data/mirage-gap
    gap convert --format lvr --input lvr/train.json --image-root lvr/images --output data/lvr-gap

Add `--strict` to stop at the first row that cannot be converted (the error names the row and the reason),
`--require-answer` to skip rows whose answer cannot be found, `--max-rows N` (N >= 1) for a quick try, `--overwrite`
to replace an existing output (refused when the output folder is, or holds, the input file or the image root).
(`--image_root` and the other underscore spellings work too.)

Image paths are read relative to `--image-root` (default: the input file's folder), and every one must resolve
inside it, after `..` and symlinks (`os.path.realpath`): a path that leads outside, relative, absolute or through a
symlink, skips its row as `outside_image_root`, and nothing outside the root is opened. `--allow-outside-root`
reads such paths anyway (absolute image paths as they are), for data whose images lie elsewhere. Only regular files
are read, and an image of more than `--max-image-pixels` pixels (default 64 Mpx) skips its row as
`image_too_large` before it is decoded (Pillow's own decompression-bomb limit, about 179 Mpx, applies too).

The input is UTF-8 (a BOM is stripped); a file whose text starts with `[` is a JSON list, anything else JSONL (one
row per line). A file that is not UTF-8, one JSON object over several lines, a JSON list that does not parse or an
input with no rows is an error naming the file, before anything is written; so is a run in which no row converts
(the reasons are printed, and the output is not written). An integer too long for Python (more than 4,300 digits)
reads as a float (`inf`), so the row fails its own checks instead of the file.

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

Rows that cannot be converted are skipped with one reason each (see `SKIP_REASONS`), whatever went wrong: an
unexpected exception of any type while converting a row is the skip `conversion_error`, with the exception in the
detail; with `--strict` the first skip raises `ConversionError` naming the row and the reason. The counts, the row
indices and the first details per reason are printed and written to `OUTPUT/conversion_report.json` (next to the
dataset files; `load_from_disk` ignores it).
"""

import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image as PILImage

from .arguments import SOURCE_FORMATS as FORMATS
from .schema import LATENT_MARKER, gap_features

REPORT_NAME = "conversion_report.json"
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses images more elongated than this
MAX_IMAGE_PIXELS = 64_000_000  # default of --max-image-pixels: larger images are skipped before decoding
MAX_DETAIL = 300  # characters of a value quoted in a skip detail
MAX_DETAIL_LINE = 1000  # characters of a skip detail

SKIP_REASONS = {
    "malformed_json": "the JSONL line does not parse as JSON",
    "malformed_row": "the row lacks a field the format needs, or a field has the wrong type or an unknown role",
    "no_assistant_turn": "the row has no assistant (gpt) turn",
    "missing_image": "an image file does not exist or is not a regular file",
    "outside_image_root": "an image path resolves (after .. and symlinks) outside --image-root "
    "(--allow-outside-root reads it anyway)",
    "unreadable_image": "an image file cannot be read or decoded",
    "image_too_large": "an image has more pixels than --max-image-pixels (or than Pillow's decompression-bomb limit)",
    "bad_image_shape": f"an image (or box crop) is empty or more elongated than {MAX_ASPECT_RATIO}:1",
    "image_placeholder_mismatch": "the number of <image> placeholders differs from the number of question images",
    "marker_aux_mismatch": "the number of latent-span markers differs from the number of helper images / boxes",
    "bad_box": "an LVR box is not 4 numbers with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1",
    "reserved_marker": f"the source text already contains GAP's marker {LATENT_MARKER}",
    "no_answer": "no answer found (only with --require-answer)",
    "unencodable_text": "a text holds a code point UTF-8 cannot encode (a lone surrogate such as \\ud800)",
    "conversion_error": "converting the row raised an unexpected error (the detail names it)",
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
        self.reason, self.detail = reason, _clip(detail, MAX_DETAIL_LINE)
        super().__init__(f"{reason}: {detail}")


@dataclass
class _Malformed:
    """A JSONL line that does not parse."""

    line: int
    error: str


# ---------------------------------------------------------------------------------------------------------------------
# Reading the input
# ---------------------------------------------------------------------------------------------------------------------


def _describe(value: Any, limit: int = MAX_DETAIL) -> str:
    """`repr(value)` for a skip detail, cut to `limit` characters; never raises (an int too long for `repr`, a
    recursive structure...)."""
    try:
        text = repr(value)
    except Exception as error:  # e.g. ValueError: an int of more than sys.get_int_max_str_digits() digits
        text = f"<{type(value).__name__} that cannot be shown: {type(error).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip(text: str, limit: int = MAX_DETAIL) -> str:
    """`text` cut to `limit` characters, with what UTF-8 cannot encode (a lone surrogate) backslash-escaped, so that
    it prints and writes anywhere."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_int(digits: str) -> int | float:
    """JSON integers as `int`, but one too long for Python's int parsing (more than 4,300 digits) as a float (`inf`):
    the row then fails its own checks (e.g. `bad_box`) instead of the whole file failing to parse."""
    try:
        return int(digits)
    except ValueError:
        return float(digits)


def _json(text: str) -> Any:
    return json.loads(text, parse_int=_parse_int)


def _decode(path: str, data: bytes) -> str:
    """The input file's text: UTF-8, a UTF-8 BOM stripped; anything else is a `ValueError` saying what to do."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); convert it to UTF-8 first, "
                         f"e.g. `iconv -f UTF-16 -t UTF-8 {path} > converted.json`")
    try:
        return data.decode("utf-8-sig")  # strips a UTF-8 BOM
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}, line {line}: {data[error.start:error.start + 4]!r}); "
            f"re-encode it as UTF-8 first, e.g. `iconv -f LATIN1 -t UTF-8 {path} > converted.json`"
        ) from None


def load_rows(path: str, max_rows: int | None = None) -> list:
    """Rows of a JSON list or a JSONL file (UTF-8, a BOM stripped). Text that starts with `[` is a JSON list; anything
    else is JSONL, one row per non-empty line. A JSONL line that does not parse becomes a `_Malformed` placeholder
    (converted to a `malformed_json` skip); a JSON list that does not parse, one JSON object over several lines, text
    that is not UTF-8 or a file with no rows is a `ValueError` naming the file, as its rows cannot be told apart."""
    if max_rows is not None:
        _check_max_rows(max_rows)
    with open(path, "rb") as handle:
        text = _decode(path, handle.read())
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = _json(text)
        except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(
                f"{path} starts like a JSON list but does not parse ({type(error).__name__}: {error}); fix the file, "
                "or write one row per line (JSONL)"
            ) from None
        if not isinstance(rows, list):  # e.g. `[1] x` cannot happen (json would refuse); kept as a guard
            raise ValueError(f"{path} is not a JSON list of rows")
    else:
        lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if len(lines) > 1 and stripped.startswith("{"):
            _refuse_single_object(path, text, lines)
        rows = []
        for number, line in lines:
            try:
                rows.append(_json(line))
            except (ValueError, RecursionError) as error:
                rows.append(_Malformed(number, f"{type(error).__name__}: {_clip(str(error))}"))
    if not rows:
        raise ValueError(f"{path} holds no rows (an empty file or an empty JSON list)")
    return rows[:max_rows] if max_rows is not None else rows


def _refuse_single_object(path: str, text: str, lines: list) -> None:
    """JSONL whose first line is not a whole object, but whose whole text is one JSON object: say so, rather than
    reading every line as a malformed row."""
    try:
        _json(lines[0][1])
        return  # the first line is a row on its own: JSONL
    except (ValueError, RecursionError):
        pass
    try:
        whole = _json(text)
    except (ValueError, RecursionError):
        return  # not one object either: JSONL with malformed lines, reported per line
    if isinstance(whole, dict):
        keys = ", ".join(map(_describe, list(whole)[:8]))
        raise ValueError(
            f"{path} is one JSON object over {len(lines)} lines (keys: {keys}), not a JSON list of rows or JSONL; "
            "give the rows as a JSON list `[row, ...]` or one JSON object per line"
        )


def _check_max_rows(max_rows: Any) -> None:
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"--max-rows must be a whole number >= 1 (or left out for all rows), not {max_rows!r}")


def _inside(path: str, root: str) -> bool:
    """Whether the real path `path` is `root` or lies under it (both `os.path.realpath`ed)."""
    return os.path.commonpath([root, path]) == root


class _ImageReader:
    """Reads images under a root, checks that they decode, caches them within one row.

    Every path must resolve (`os.path.realpath`: `..` and symlinks followed) inside the root, unless
    `allow_outside_root`; only regular files are opened; an image of more than `max_image_pixels` pixels is refused
    from its header, before it is decoded. `opened`, a set, collects the real path of every file read."""

    def __init__(self, image_root: str | None, *, allow_outside_root: bool = False,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS, opened: set | None = None):
        self.root = os.path.realpath(image_root if image_root else os.getcwd())
        self.allow_outside_root = allow_outside_root
        self.max_image_pixels = max_image_pixels
        self.opened = opened
        self.cache: dict[str, tuple[bytes, PILImage.Image]] = {}

    def resolve(self, reference: Any) -> str:
        """The real path of an image reference, inside the root (else the skip `outside_image_root`)."""
        if not isinstance(reference, str) or not reference:
            raise _Skip("malformed_row", f"image reference {_describe(reference)} is not a path")
        if "\0" in reference:
            raise _Skip("malformed_row", f"image reference {_describe(reference)} holds a NUL character")
        try:
            os.fsencode(reference)
        except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
            raise _Skip("malformed_row", f"image reference {_describe(reference)} is no valid file name") from None
        if reference.startswith("file://"):
            reference = reference[len("file://") :]
        real = os.path.realpath(os.path.join(self.root, reference))  # an absolute reference replaces the root
        if not self.allow_outside_root and not _inside(real, self.root):
            how = "the absolute path" if os.path.isabs(reference) else "the path"
            raise _Skip("outside_image_root", f"{how} {_describe(reference)} resolves to {_describe(real)}, outside "
                                              f"the image root {self.root} (--allow-outside-root reads it)")
        return real

    def read(self, reference: Any) -> tuple[bytes, PILImage.Image]:
        path = self.resolve(reference)
        if path not in self.cache:
            if not os.path.isfile(path):  # follows no symlink (realpath did); a FIFO, device or folder is no file
                what = "no file" if not os.path.lexists(path) else "not a regular file:"
                raise _Skip("missing_image", f"{what} {path}")
            if self.opened is not None:
                self.opened.add(path)
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as error:  # e.g. /proc/self/mem (EIO), permission denied
                raise _Skip("unreadable_image", f"{path}: {type(error).__name__}: {error}") from None
            self.cache[path] = (data, self._decode(data, path))
        return self.cache[path]

    def _decode(self, data: bytes, path: str) -> PILImage.Image:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # our own limit decides below it
            try:
                image = PILImage.open(io.BytesIO(data))
            except PILImage.DecompressionBombError as error:
                raise _Skip("image_too_large", f"{path}: {error}") from None
            except Exception as error:  # PIL raises many kinds
                raise _Skip("unreadable_image", f"{path}: {type(error).__name__}: {error}") from None
            width, height = image.size
            if self.max_image_pixels is not None and width * height > self.max_image_pixels:
                raise _Skip("image_too_large", f"{path} is {width}x{height} = {width * height} pixels, more than "
                                               f"--max-image-pixels {self.max_image_pixels}")
            try:
                image.load()
            except PILImage.DecompressionBombError as error:
                raise _Skip("image_too_large", f"{path}: {error}") from None
            except Exception as error:
                raise _Skip("unreadable_image", f"{path}: {type(error).__name__}: {error}") from None
        _check_shape(image.size, path)
        return image

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
                    raise _Skip("malformed_row", f"turn {turn_index} ({role}) has an item of type {_describe(kind)}")
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
                    and not (isinstance(previous.get("text"), str) and MONET_SPAN.search(previous["text"]))
                ):
                    raise _Skip(
                        "marker_aux_mismatch",
                        f"turn {turn_index}: helper image (item {item_index}) follows a text item without "
                        "<abs_vis_token></abs_vis_token>",
                    )
                aux_images.append(reader.encoded(_monet_image(item, turn_index)))
            else:
                raise _Skip("malformed_row", f"turn {turn_index} (assistant) has an item of type {_describe(kind)}")
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
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or turn["from"] not in LVR_ROLES:
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
    boxes = [_box(box, box_index) for box_index, box in enumerate(boxes)]
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


def _box(box: Any, box_index: int) -> tuple[float, float, float, float]:
    """An LVR box as 4 floats with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, else the skip `bad_box` (also for an
    int too large for a float, such as 10**400)."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise _Skip("bad_box", f"box {box_index} is {_describe(box)}, not 4 numbers")
    try:
        values = tuple(float(v) for v in box)
    except OverflowError:
        raise _Skip("bad_box", f"box {box_index} holds a number too large for a float: {_describe(box)}") from None
    if not all(math.isfinite(v) for v in values):
        raise _Skip("bad_box", f"box {box_index} is {_describe(box)}, not 4 finite numbers")
    x1, y1, x2, y2 = values
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise _Skip("bad_box", f"box {box_index} {_describe(list(values))} is empty or outside [0, 1]")
    return values


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


def _error_detail(error: BaseException) -> str:
    try:
        message = str(error)
    except Exception:
        message = "(the message cannot be shown)"
    return f"{type(error).__name__}: {_clip(message)}"


def _check_encodable(value: Any, where: str = "row") -> None:
    """Every string of a record encodes as UTF-8 (Arrow's string type), else the skip `unencodable_text`: a lone
    surrogate such as `\\ud800` (JSON's `"\\ud800"` escape) would otherwise fail the write of a whole batch."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise _Skip("unencodable_text", f"{where} holds {value[error.start:error.end]!r} at character "
                                            f"{error.start}, which UTF-8 cannot encode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "bytes":
                _check_encodable(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _check_encodable(item, f"{where}[{position}]")


def iter_convert(
    format: str,
    rows: Iterable,
    image_root: str | None = None,
    *,
    strict: bool = False,
    require_answer: bool = False,
    keep_observation_tags: bool = False,
    allow_outside_root: bool = False,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    opened: set | None = None,
) -> Iterator[tuple[int, dict | None, dict | None]]:
    """Yield `(index, record, None)` for each converted row and `(index, None, skip)` for each skipped one, where
    `skip = {"row", "reason", "detail"}`. With `strict`, the first skip raises `ConversionError` instead.

    Image paths resolve against `image_root` (default: the current folder) and must stay inside it unless
    `allow_outside_root`; images of more than `max_image_pixels` pixels (None: no limit of ours) are skipped;
    `opened`, a set, collects the real path of every image file read. Any exception while converting a row is a
    skip (`conversion_error` when no specific reason applies), never a crash."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    _check_max_image_pixels(max_image_pixels)
    convert = {"monet": _monet_row, "mirage": _mirage_row, "lvr": _lvr_row}[format]
    options = {"keep_observation_tags": keep_observation_tags} if format == "monet" else {}
    reader_options = dict(allow_outside_root=allow_outside_root, max_image_pixels=max_image_pixels, opened=opened)
    for index, row in enumerate(rows):
        try:
            if isinstance(row, _Malformed):
                raise _Skip("malformed_json", f"line {row.line}: {row.error}")
            record = convert(row, _ImageReader(image_root, **reader_options), **options)
            if require_answer and not record["answer"]:
                raise _Skip("no_answer", "no answer field, <answer> tag or \\boxed{}")
            _check_encodable(record)
            record["source_index"] = index
        except Exception as error:  # noqa: BLE001 - every per-row failure is a named skip, of any type
            reason, detail = (error.reason, error.detail) if isinstance(error, _Skip) else (
                "conversion_error", _error_detail(error))
            if strict:
                raise ConversionError(index, reason, detail) from (None if isinstance(error, _Skip) else error)
            yield index, None, {"row": index, "reason": reason, "detail": detail}
            continue
        yield index, record, None


def _check_max_image_pixels(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"--max-image-pixels must be a whole number >= 1 (or None for Pillow's own limit only), "
                         f"not {value!r}")


def _convert_all(format, rows, image_root=None, **options) -> tuple[list[dict], list[dict]]:
    records, skipped = [], []
    for _, record, skip in iter_convert(format, rows, image_root, **options):
        (records if record is not None else skipped).append(record if record is not None else skip)
    return records, skipped


def convert_monet(rows, image_root=None, **options) -> tuple[list[dict], list[dict]]:
    """Monet rows (`{"data": [system, user, assistant], "metadata"}`) -> (records, skipped). Options (as
    `iter_convert`): `strict`, `require_answer`, `keep_observation_tags`, `allow_outside_root`, `max_image_pixels`."""
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


def _check_paths(args, image_root: str) -> None:
    """File-level checks before anything is read or deleted: the input is a file, the image root a folder, and the
    output folder neither is nor holds the input file or the image root (`--overwrite` would delete them)."""
    if not os.path.isfile(args.input):
        raise ValueError(f"--input {args.input} is not a file")
    if not os.path.isdir(image_root):
        raise ValueError(f"--image-root {image_root} is not a folder (image paths are read relative to it)")
    output = os.path.realpath(args.output)
    for what, path in (("the input file", args.input), ("the image root", image_root)):
        real = os.path.realpath(path)
        if _inside(real, output):
            where = "is" if real == output else "holds"
            raise ValueError(
                f"--output {args.output} {where} {what} {path}; writing the dataset there (--overwrite) would delete "
                "it: choose an output folder outside the input's and the images' folders"
            )
    if os.path.lexists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f"--output {args.output} exists and is not a folder")
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} exists and is not empty (pass --overwrite to replace it)")


def _print_summary(report: dict, details: bool = False) -> None:
    for reason, entry in report["skipped"].items():
        print(f"  skipped {entry['count']:>7}  {reason}: {SKIP_REASONS[reason]}")
        if details and entry["details"]:
            row, detail = next(iter(entry["details"].items()))
            print(f"           e.g. row {row}: {_clip(detail)}")


def convert_dataset(args) -> dict:
    """`gap convert` (`args`: a `trainers.arguments.ConvertDatasetArguments`): convert `args.input`, save the dataset
    to `args.output`, write and return the report. Raises `ValueError` naming the file for problems with the input,
    the image root or the output folder, and when no row converts (the output is then left as it was)."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    allow_outside_root = getattr(args, "allow_outside_root", False)
    max_image_pixels = getattr(args, "max_image_pixels", MAX_IMAGE_PIXELS)
    if args.max_rows is not None:
        _check_max_rows(args.max_rows)
    _check_max_image_pixels(max_image_pixels)
    image_root = args.image_root if args.image_root is not None else os.path.dirname(os.path.abspath(args.input))
    _check_paths(args, image_root)
    rows = load_rows(args.input, args.max_rows)
    features = gap_features()
    parent = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(parent, exist_ok=True)
    skipped, no_answer, converted, opened = [], [], 0, set()
    scratch = tempfile.mkdtemp(prefix=".convert-", dir=parent)  # same disk as the output
    try:
        shard = os.path.join(scratch, "rows.arrow")
        with ArrowWriter(features=features, path=shard, writer_batch_size=100) as writer:
            progress = tqdm(
                iter_convert(args.format, rows, image_root, strict=args.strict, require_answer=args.require_answer,
                             keep_observation_tags=args.keep_observation_tags, allow_outside_root=allow_outside_root,
                             max_image_pixels=max_image_pixels, opened=opened),
                total=len(rows), desc=f"converting {args.format}", unit="row",
            )
            for index, record, skip in progress:
                if record is not None:
                    try:
                        example = features.encode_example(record)
                    except Exception as error:  # noqa: BLE001 - a row Arrow cannot take is a skip too
                        if args.strict:
                            raise ConversionError(index, "conversion_error", _error_detail(error)) from error
                        record, skip = None, {"row": index, "reason": "conversion_error",
                                              "detail": _error_detail(error)}
                if record is None:
                    skipped.append(skip)
                    progress.set_postfix(skipped=len(skipped), refresh=False)
                    continue
                if not record["answer"]:
                    no_answer.append(index)
                try:
                    writer.write(example)
                except Exception as error:  # noqa: BLE001 - a batch write fails for a row the checks let through
                    raise ValueError(f"writing the batch of converted rows that ends at row {index} of {args.input} "
                                     f"failed ({_error_detail(error)}); run with --strict --max-rows {index + 1} "
                                     "to find the row") from error
                converted += 1
            writer.finalize()
        report = summarize(args.format, args.input, args.output, len(rows), converted, skipped, no_answer)
        if converted == 0:
            print(f"converted 0 of {len(rows)} {args.format} rows of {args.input}")
            _print_summary(report, details=True)
            first = min(report["skipped"].items(), key=lambda item: item[1]["rows"][0])
            hint = (" (check --image-root, or pass --allow-outside-root)" if "outside_image_root" in report["skipped"]
                    else "")
            counts = ", ".join(f"{reason} {entry['count']}" for reason, entry in report["skipped"].items())
            raise ValueError(
                f"no row of {args.input} converted: all {len(rows)} skipped ({counts}){hint}; "
                f"the first, row {first[1]['rows'][0]}: {first[0]}; --strict stops there with the detail. "
                f"{args.output} was not written"
            )
        output = os.path.realpath(args.output)
        inside = sorted(path for path in opened if _inside(path, output))
        if inside and os.path.exists(args.output):
            raise ValueError(f"--output {args.output} holds image(s) the rows read ({inside[0]}); replacing it would "
                             "delete them: choose another output folder")
        dataset = Dataset.from_file(shard)
        if os.path.exists(args.output):
            shutil.rmtree(args.output)
        dataset.save_to_disk(args.output)
        del dataset
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with open(os.path.join(args.output, REPORT_NAME), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"converted {converted} of {len(rows)} {args.format} rows into {args.output}")
    _print_summary(report)
    if "outside_image_root" in report["skipped"]:
        print(f"  (images outside --image-root {image_root} are not read; --allow-outside-root reads them)")
    if no_answer:
        print(f"  kept {len(no_answer)} row(s) without an answer (answer ''); --require-answer skips them")
    print(f"report: {os.path.join(args.output, REPORT_NAME)}")
    return report


__all__ = [
    "FORMATS", "SKIP_REASONS", "ConversionError", "convert_dataset", "convert_lvr", "convert_mirage",
    "convert_monet", "extract_answer", "iter_convert", "load_rows", "lvr_box_pixels", "records_to_dataset",
]
