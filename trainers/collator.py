"""Dataset rows in GAP's schema (`trainers.schema`) -> model inputs: the collator, capacity selection and up-front
validation.

What `GapDataCollator` does with one row:

1. Checks the types; loads every image (PIL images, paths, or `{"bytes", "path"}` dicts as `datasets` stores them).
   Checks the text as the chat template will join it: a `<|latent|>` marker split across two text parts, and any
   special-token string of the tokenizer typed in the text (`<|im_end|>`, `<|vision_start|>`, `<|latent_end|>`, ...:
   it would become the real control token) are errors naming the row and the message (`escape_special_tokens=True`
   trains such strings as plain text instead).
2. Image placeholders: when no message has an image part but the row has images, one `{"type": "image"}` part per
   image is put at the start of the first user turn (TRL's convention for string contents); otherwise the number of
   image parts must equal the number of images.
3. Capacity (`capacity_guided=True`): a row with `use_latent=False` (or, without `use_latent`, `base_pass_rate >
   capacity_threshold`) trains as plain text: its markers and aux images are removed (see `remove_latent_markers` for
   how the text around a removed marker is joined). `use_latent` wins over `base_pass_rate` when both are set.
4. Renders the chat template, expands each marker to `<|latent_start|> K x <|latent_pad|> <|latent_end|>` and encodes
   the aux images (the processor), and builds the labels: assistant turns only (ChatML: from after
   `<|im_start|>assistant\\n` up to and including `<|im_end|>`); image pads, vision start/end and latent slots are
   masked. `<|latent_start|>` and `<|latent_end|>` stay supervised: the model must learn to open a span.
5. `max_length`: a sequence may only be cut in text after its last image and its last latent span; a cut image or
   span is an error, and so is a cut that leaves no supervised token.

TRL's other formats: a conversational prompt-completion row is its `prompt` + `completion` messages (labels: the
completion, TRL's mask); a plain-text row (`text`, or string `prompt` / `completion`, or what `formatting_func` returns)
is encoded as the raw text with EOS appended, all of it (or the completion) labelled. `assistant_only_loss=False`
labels the whole conversation, as TRL does.

Rows are padded on the right (training), whatever `tokenizer.padding_side` says; `padding_free=True` concatenates
them instead (`position_ids` restarting at each row, no `attention_mask`). Every malformed row raises a
`GapDataError` whose message starts with `Row <index>:`. The index is the dataset index when the row carries the
`gap_row_index` column (which `GapSFTTrainer` adds), otherwise the row's position in the list given to the collator.
`validate_gap_dataset` runs the same checks over a whole dataset (images decoded from their stored bytes, so that an
unreadable file is reported by row instead of failing inside the data loader) before training starts.
"""

import io
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from modeling_gap.configuration_gap import LATENT_MARKER

from .schema import ROLES, remove_latent_markers, row_format, row_markers, row_messages

ROW_INDEX_COLUMN = "gap_row_index"
PACKED_ROWS = "gap_packed_rows"  # an item of a packed dataset: the list of rows of one pack


def pack_rows_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing, as TRL's `packing_strategy="bfd"`, over whole rows: the row indices grouped into packs of
    at most `capacity` tokens (longest rows first, each into the fullest pack it fits; a row is never split)."""
    packs, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = min(lengths[index], capacity)
        fits = [p for p, free in enumerate(room) if free >= length]
        if fits:
            best = min(fits, key=lambda p: room[p])
            packs[best].append(index)
            room[best] -= length
        else:
            packs.append([index])
            room.append(capacity - length)
    return [sorted(pack) for pack in packs]


class PackedRows:
    """`datasets` transform of a packed dataset (one `gap_pack` column of row indices): each item becomes the list of
    its rows from `source`, under `PACKED_ROWS`, which `GapDataCollator` concatenates padding-free."""

    def __init__(self, source):
        self.source = source

    def __call__(self, batch):
        return {PACKED_ROWS: [[self.source[i] for i in pack] for pack in batch["gap_pack"]]}


class GapDataError(ValueError):
    """A malformed dataset row; the message is `Row <index>: <problem>`."""

    def __init__(self, index, problem: str):
        self.index, self.problem = index, problem
        super().__init__(f"Row {index}: {problem}")


class GapDatasetValidationError(GapDataError):
    """`validate_gap_dataset` found bad rows: `errors` lists them all (up to `max_errors`); the message starts with
    the first."""

    def __init__(self, errors: list[GapDataError], total: int):
        self.errors = errors
        first = errors[0]
        more = ""
        if total > 1:
            listed = "; ".join(str(e) for e in errors[1:6])
            more = f" [{total} bad rows in all; next: {listed}{' ...' if total > 6 else ''}]"
        super().__init__(first.index, first.problem + more)


def _type_name(value) -> str:
    return type(value).__name__


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0 and value.dtype.kind in "iuf"
    )


def _is_bool(value) -> bool:
    return isinstance(value, bool) or (
        hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0 and value.dtype.kind == "b"
    )


def load_image(value, index, what: str) -> Image.Image:
    """One image of a row -> an RGB PIL image; `what` names it in errors ("image 0", "aux image 1")."""
    if value is None:
        raise GapDataError(index, f"{what} is missing (None).")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        elif isinstance(value, Mapping) and (value.get("bytes") or value.get("path")):
            image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, Mapping):
            raise GapDataError(index, f"{what} is missing (no bytes and no path).")
        else:
            raise GapDataError(
                index, f"{what} has the wrong type {_type_name(value)}: expected a PIL image, a path or a "
                "{'bytes', 'path'} dict."
            )
        image.load()
    except GapDataError:
        raise
    except FileNotFoundError as error:
        raise GapDataError(index, f"{what} is missing: file not found ({error.filename}).") from error
    except Exception as error:  # PIL raises several types for corrupt or truncated files
        raise GapDataError(index, f"{what} cannot be read ({_type_name(error)}: {error}).") from error
    if min(image.size) < 1:
        raise GapDataError(index, f"{what} is empty ({image.size[0]}x{image.size[1]}).")
    return image.convert("RGB") if image.mode != "RGB" else image


@dataclass
class PreparedRow:
    """One row checked and reduced to what the processor needs: `messages` normalised (content as lists of parts,
    image placeholders in place, markers removed when the row trains as plain text), `images`, `aux_images`, and
    whether the row keeps its latent spans."""

    index: Any
    messages: list[dict]
    images: list[Image.Image]
    aux_images: list[Image.Image]
    use_latent: bool
    num_markers: int
    kind: str = "messages"  # the row's format (`trainers.schema.row_format`)
    num_prompt_messages: int | None = None  # conversational prompt-completion: the prompt's messages
    text: str | None = None  # text rows: the text to encode (markers kept or removed by capacity)
    prompt_text: str | None = None  # string prompt-completion: the prompt part of `text`


class GapDataCollator:
    """Collates dataset rows in GAP's schema into the inputs of `GapQwen2_5VLForConditionalGeneration`.

    Returns `input_ids`, `attention_mask`, `mm_token_type_ids`, `labels`, and, when present in the batch,
    `pixel_values` / `image_grid_thw` (question images, in row order) and `aux_pixel_values` / `aux_image_grid_thw`
    (one aux image per kept span, in row order: the latent targets are built from them inside the model's forward).
    Every key is a forward argument, so `model(**collator(rows))` works. An item of a packed dataset (`PACKED_ROWS`:
    the rows of one pack, see `pack_rows_bfd`) stands for its rows.

    Args:
        processor: a `GapQwen2_5VLProcessor` (it expands `<|latent|>` markers and encodes the aux images).
        max_length (`int`, *optional*): longest sequence; longer ones are cut at the right, in text only (see the
            module docstring). `None`: no limit.
        capacity_guided (`bool`, defaults to `True`): honour `use_latent` / `base_pass_rate` per row.
        capacity_threshold (`float`, defaults to 0.5): rows with only `base_pass_rate` keep their spans when the rate
            is <= this.
        pad_to_multiple_of (`int`, *optional*): pad the sequence length to a multiple of this.
        escape_special_tokens (`bool`, defaults to `False`): a special-token string of the tokenizer (`<|im_end|>`,
            `<|vision_start|>`, `<|latent_start|>`, ...) typed in a row's text is an error naming the row; with
            `True` it is trained as plain text instead (a word joiner, U+2060, after its first character keeps the
            tokenizer from reading it as the control token).
        return_row_indices (`bool`, defaults to `False`): add `gap_row_indices` (the dataset row of each batch
            position) to the batch, for a trainer to name rows in errors (not a forward argument: pop it first).
        assistant_only_loss (`bool`, *optional*): which tokens of a conversational row are labels. `None` (GAP's
            default): the assistant turns of `messages` rows, the completion of prompt-completion rows. `True`: the
            assistant turns only (a text row is then an error, as in TRL). `False`: the whole conversation, as TRL
            trains it (system, user turns and image tokens included; latent slots are never labels).
        completion_only_loss (`bool`, *optional*): prompt-completion rows: `None` / `True` supervise the completion
            only (TRL's default), `False` the prompt too. `True` on a `messages` or text row is an error, as in TRL.
        dataset_text_field (`str`, defaults to `"text"`): the column of plain-text rows.
        formatting_func (`callable`, *optional*): row -> string: each row is trained as that text (TRL's
            `formatting_func`; the row's images and aux images are kept).
        padding_free (`bool`, defaults to `False`): concatenate the rows into one batch row without padding: no
            `attention_mask`, `position_ids` (1, total) restarting at 0 where each row starts (the model computes each
            row's M-RoPE positions and keeps attention within rows), the first label of each row -100.
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        capacity_guided: bool = True,
        capacity_threshold: float = 0.5,
        pad_to_multiple_of: int | None = None,
        escape_special_tokens: bool = False,
        return_row_indices: bool = False,
        assistant_only_loss: bool | None = None,
        completion_only_loss: bool | None = None,
        dataset_text_field: str = "text",
        formatting_func=None,
        padding_free: bool = False,
    ):
        if padding_free and pad_to_multiple_of:
            raise ValueError("pad_to_multiple_of pads rows, which padding_free=True concatenates: set one of them.")
        self.assistant_only_loss = assistant_only_loss
        self.completion_only_loss = completion_only_loss
        self.dataset_text_field = dataset_text_field
        self.formatting_func = formatting_func
        self.padding_free = padding_free
        self.processor = processor
        self.escape_special_tokens = escape_special_tokens
        self.return_row_indices = return_row_indices
        self.max_length = max_length
        self.capacity_guided = capacity_guided
        self.capacity_threshold = capacity_threshold
        self.pad_to_multiple_of = pad_to_multiple_of
        self.marker = getattr(processor, "latent_marker", LATENT_MARKER)
        tokenizer = processor.tokenizer
        self.latent_pad_id, self.latent_start_id, self.latent_end_id = processor.latent_token_ids
        vocab = tokenizer.get_vocab()
        for token in ("<|im_start|>", "<|im_end|>"):
            if token not in vocab:
                raise ValueError(
                    f"GapDataCollator needs a ChatML chat template (Qwen's): the tokenizer has no {token}."
                )
        self.im_start_id = vocab["<|im_start|>"]
        self.im_end_id = vocab["<|im_end|>"]
        self.assistant_ids = tokenizer.encode("assistant", add_special_tokens=False)
        newline = tokenizer.encode("\n", add_special_tokens=False)
        self.newline_id = newline[0] if len(newline) == 1 else None
        image_tokens = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
        self.image_ids = {vocab[t] for t in image_tokens if t in vocab}
        self.unsupervised_ids = self.image_ids | {self.latent_pad_id}
        self.protected_ids = self.image_ids | {self.latent_pad_id, self.latent_start_id, self.latent_end_id}
        # Every string the tokenizer reads as one special token, longest first (so a search names the whole token).
        special = set(tokenizer.all_special_tokens)
        special |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        special |= {tokenizer.convert_ids_to_tokens(i) for i in processor.latent_token_ids}
        self.special_tokens = sorted(special, key=len, reverse=True)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = vocab.get("<|endoftext|>", tokenizer.eos_token_id)
        self.pad_token_id = pad_id

    # ---- one row -------------------------------------------------------------------------------------------
    def uses_latent(self, row: Mapping, index) -> bool:
        """Whether the row keeps its latent spans (checks the types of `use_latent` and `base_pass_rate`)."""
        use = row.get("use_latent")
        rate = row.get("base_pass_rate")
        if use is not None and not _is_bool(use):
            raise GapDataError(index, f"use_latent must be a bool or None; got {_type_name(use)} {use!r}.")
        if rate is not None:
            if not _is_number(rate) or not (0 <= float(rate) <= 1) or math.isnan(float(rate)):
                raise GapDataError(index, f"base_pass_rate must be a number in [0, 1] or None; got {rate!r}.")
        if not self.capacity_guided:
            return True
        if use is not None:
            return bool(use)
        if rate is not None:
            return float(rate) <= self.capacity_threshold
        return True

    def _parts(self, content, index, turn: int) -> list[dict]:
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            raise GapDataError(
                index, f"message {turn} has content of type {_type_name(content)}; expected a string or a list of "
                "parts."
            )
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise GapDataError(index, f"message {turn}, part {j} is a {_type_name(part)}, not a dict.")
            kind = part.get("type")
            if kind == "image" or (kind is None and part.get("image") is not None):
                parts.append({"type": "image"})
            elif kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise GapDataError(
                        index, f"message {turn}, part {j} is a text part whose text is {_type_name(text)}."
                    )
                parts.append({"type": "text", "text": text})
            else:
                raise GapDataError(
                    index, f"message {turn}, part {j} has type {kind!r}; expected 'text' or 'image'."
                )
        return parts

    def _special_token_in(self, text: str) -> str | None:
        """The special token that appears first in `text` (the longest, where two start at the same place)."""
        found = [(text.index(token), -len(token), token) for token in self.special_tokens if token in text]
        return min(found)[2] if found else None

    def _check_text(self, messages: list[dict], index):
        """What the chat template will join: markers and special-token strings, per message (text parts joined, as
        the template renders them)."""
        for turn, message in enumerate(messages):
            parts = [p for p in message["content"] if p["type"] == "text"]
            joined = "".join(p["text"] for p in parts)
            where = f"message {turn} ({message['role']})"
            if joined.count(self.marker) != sum(p["text"].count(self.marker) for p in parts):
                raise GapDataError(
                    index, f"{where}: a {self.marker} marker is split across two text parts, which the chat "
                    "template joins into one: put each marker inside one text part."
                )
            token = self._special_token_in(joined)
            if token is None:
                continue
            if self.escape_special_tokens:
                for part in parts:
                    for special in self.special_tokens:
                        part["text"] = part["text"].replace(special, special[0] + "\u2060" + special[1:])
                token = self._special_token_in("".join(p["text"] for p in parts))
                if token is None:
                    continue
                raise GapDataError(
                    index, f"{where}: the special token {token!r} is split across two text parts, which the chat "
                    "template joins into the real token: put it inside one text part, or remove it."
                )
            raise GapDataError(
                index, f"{where} contains the special token {token!r} as text: the tokenizer would read it as the "
                "real control token (ending a turn, opening an image or a latent span). Remove it from the text, or "
                "set escape_special_tokens=True (a GapSFTConfig field) to train it as plain text."
            )

    def prepare_row(self, row: Mapping, index) -> PreparedRow:
        """Check one row and normalise it (steps 1-3 of the module docstring). Raises `GapDataError`."""
        if not isinstance(row, Mapping):
            raise GapDataError(index, f"the row is a {_type_name(row)}, not a dict of columns.")
        if self.formatting_func is not None:
            try:
                formatted = self.formatting_func(row)
            except Exception as error:
                raise GapDataError(index, f"formatting_func failed ({_type_name(error)}: {error}).") from error
            if not isinstance(formatted, str):
                raise GapDataError(index, f"formatting_func must return a string; got {_type_name(formatted)}.")
            row = {k: v for k, v in row.items() if k not in ("messages", "prompt", "completion")}
            row[self.dataset_text_field] = formatted
        kind = row_format(row, self.dataset_text_field)
        if kind is None:
            if "input_ids" in row:
                raise GapDataError(
                    index, "pre-tokenized rows (input_ids) cannot carry GAP's images, aux images and latent spans, "
                    "which the collator encodes: give `messages`, `prompt`/`completion` or text rows."
                )
            if "messages" in row:
                raise GapDataError(index, "messages is missing (None).")
            raise GapDataError(
                index, f"no 'messages', 'prompt'/'completion' or '{self.dataset_text_field}' column "
                f"(columns: {sorted(row)})."
            )
        if kind == "messages":
            raw_messages = row["messages"]
            if not isinstance(raw_messages, (list, tuple)) or not raw_messages:
                raise GapDataError(
                    index, "messages must be a non-empty list of {role, content} dicts; got "
                    f"{_type_name(raw_messages)}."
                )
        else:
            raw_messages = row_messages(row)
        if kind == "messages" and self.completion_only_loss:
            raise GapDataError(
                index, "completion_only_loss=True needs prompt-completion rows; this row has `messages` (use "
                "assistant_only_loss for conversations)."
            )
        if kind in ("text", "prompt_completion_text") and self.assistant_only_loss:
            raise GapDataError(
                index, "assistant_only_loss=True needs conversational rows; this is a text row (set "
                "assistant_only_loss=False or leave it unset)."
            )
        images = row.get("images", None)
        if images is None and row.get("image") is not None:
            images = [row["image"]]
        images = [] if images is None else images
        aux_images = row.get("aux_images", None)
        aux_images = [] if aux_images is None else aux_images
        for name, value in (("images", images), ("aux_images", aux_images)):
            if not isinstance(value, (list, tuple)):
                raise GapDataError(index, f"{name} must be a list of images; got {_type_name(value)}.")
        if "answer" in row and row["answer"] is not None and not isinstance(row["answer"], str):
            raise GapDataError(index, f"answer must be a string; got {_type_name(row['answer'])}.")
        if kind in ("text", "prompt_completion_text"):
            return self._prepare_text_row(row, index, kind, images, aux_images)

        num_prompt_messages = None
        if kind == "prompt_completion":
            num_prompt_messages = len(row["prompt"])
            first = row["completion"][0] if row["completion"] else None
            if not isinstance(first, Mapping) or first.get("role") != "assistant":
                raise GapDataError(index, "the completion must start with an assistant turn.")

        messages = []
        for turn, message in enumerate(raw_messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise GapDataError(index, f"message {turn} is not a {{role, content}} dict: {message!r:.80}.")
            role = message["role"]
            if role not in ROLES:
                raise GapDataError(index, f"message {turn} has role {role!r}; expected one of {ROLES}.")
            messages.append({"role": role, "content": self._parts(message["content"], index, turn)})
        if not any(m["role"] == "assistant" for m in messages):
            raise GapDataError(index, "no assistant turn: there is nothing to supervise.")
        self._check_text(messages, index)

        markers = 0
        for turn, message in enumerate(messages):
            count = sum(p["text"].count(self.marker) for p in message["content"] if p["type"] == "text")
            if count and message["role"] != "assistant":
                raise GapDataError(
                    index, f"message {turn} ({message['role']}) holds {count} {self.marker} marker(s): latent spans "
                    "belong in assistant turns."
                )
            markers += count
        if markers != len(aux_images):
            raise GapDataError(
                index, f"{markers} {self.marker} marker(s) but {len(aux_images)} aux image(s): each marker needs "
                "exactly one aux image, in order."
            )

        image_parts = sum(p["type"] == "image" for m in messages for p in m["content"])
        if image_parts == 0 and images:
            user = next((m for m in messages if m["role"] == "user"), None)
            if user is None:
                raise GapDataError(index, f"{len(images)} image(s) but no user turn to put them in.")
            user["content"] = [{"type": "image"} for _ in images] + user["content"]
        elif image_parts != len(images):
            raise GapDataError(
                index, f"the messages hold {image_parts} image placeholder(s) but the row has {len(images)} image(s)."
            )

        for message in messages:  # adjacent text parts as one, as the chat template renders them
            merged = []
            for part in message["content"]:
                if part["type"] == "text" and merged and merged[-1]["type"] == "text":
                    merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
                else:
                    merged.append(part)
            message["content"] = merged

        use_latent = self.uses_latent(row, index)
        if not use_latent and markers:
            for message in messages:
                if message["role"] == "assistant":
                    for part in message["content"]:
                        if part["type"] == "text":
                            part["text"] = remove_latent_markers(part["text"], self.marker)
            aux_images = []

        for turn, message in enumerate(messages):
            if message["role"] == "assistant":
                text = "".join(p["text"] for p in message["content"] if p["type"] == "text")
                if not text.replace(self.marker, "").strip():
                    raise GapDataError(index, f"message {turn} is an empty assistant turn (no text to supervise).")

        loaded = [load_image(image, index, f"image {j}") for j, image in enumerate(images)]
        loaded_aux = [load_image(image, index, f"aux image {j}") for j, image in enumerate(aux_images)]
        return PreparedRow(
            index, messages, loaded, loaded_aux, use_latent and markers > 0, markers, kind, num_prompt_messages
        )

    def _prepare_text_row(self, row: Mapping, index, kind: str, images, aux_images) -> PreparedRow:
        """A plain-text row (TRL's language modeling or string prompt-completion format): trained as the raw text,
        with the tokenizer's EOS appended when missing (as TRL does); image placeholders and span markers in the
        text are expanded by the processor."""
        eos = self.processor.tokenizer.eos_token or ""
        if kind == "text":
            prompt, text = None, row[self.dataset_text_field]
        else:
            prompt, text = row["prompt"], row["prompt"] + row["completion"]
            if self.marker in prompt:
                raise GapDataError(index, f"the prompt holds a {self.marker} marker: latent spans belong in the "
                                   "completion.")
        if not text.endswith(eos):
            text += eos
        markers = text.count(self.marker)
        if markers != len(aux_images):
            raise GapDataError(
                index, f"{markers} {self.marker} marker(s) but {len(aux_images)} aux image(s): each marker needs "
                "exactly one aux image, in order."
            )
        use_latent = self.uses_latent(row, index)
        if not use_latent and markers:
            text, aux_images = remove_latent_markers(text, self.marker), []
        if not text.strip():
            raise GapDataError(index, f"the {self.dataset_text_field} is empty.")
        loaded = [load_image(image, index, f"image {j}") for j, image in enumerate(images)]
        loaded_aux = [load_image(image, index, f"aux image {j}") for j, image in enumerate(aux_images)]
        return PreparedRow(
            index, [], loaded, loaded_aux, use_latent and markers > 0, markers, kind, text=text, prompt_text=prompt
        )

    def _assistant_mask(self, ids: list[int]) -> list[bool]:
        """True from after each `<|im_start|>assistant\\n` up to and including its `<|im_end|>`."""
        mask = [False] * len(ids)
        header = self.assistant_ids
        i = 0
        while i < len(ids):
            if ids[i] == self.im_start_id and ids[i + 1 : i + 1 + len(header)] == header:
                begin = i + 1 + len(header)
                if begin < len(ids) and ids[begin] == self.newline_id:
                    begin += 1
                end = begin
                while end < len(ids) and ids[end] != self.im_end_id:
                    end += 1
                for j in range(begin, min(end + 1, len(ids))):
                    mask[j] = True
                i = end + 1
            else:
                i += 1
        return mask

    def _label_mask(self, prepared: PreparedRow, ids: list[int], encoded) -> list[bool]:
        """Which tokens of the encoded row are labels (before image and latent slots are taken out): see
        `assistant_only_loss` and `completion_only_loss` in the class docstring."""
        index = prepared.index
        if prepared.kind == "text":
            return [True] * len(ids)
        if prepared.kind == "prompt_completion_text":
            if self.completion_only_loss is False:
                return [True] * len(ids)
            # The completion starts where the prompt's tokens end; the processor expands each image pad of the
            # prompt into the image's tokens (every image of a prompt-completion row is in its prompt).
            tokenizer = self.processor.tokenizer
            prompt_text = prepared.prompt_text
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(prepared.text, add_special_tokens=False)["input_ids"]
            common = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(prompt_ids))
            grid = encoded.get("image_grid_thw")
            merge = getattr(self.processor.image_processor, "merge_size", 2)
            extra = 0 if grid is None else int((grid.prod(-1) // merge**2 - 1).sum())
            if not prompt_text:
                common = 0
            start = common + extra
            return [i >= start for i in range(len(ids))]

        assistant = self._assistant_mask(ids)
        if not any(assistant):
            raise GapDataError(
                index, "no assistant tokens found: the chat template must render assistant turns as ChatML "
                "(<|im_start|>assistant ... <|im_end|>)."
            )
        turn_starts = [i for i, m in enumerate(assistant) if m and (i == 0 or not assistant[i - 1])]
        wanted_turns = sum(m["role"] == "assistant" for m in prepared.messages)
        if len(turn_starts) != wanted_turns:  # the rendered conversation is not the row's (e.g. a template quirk)
            raise GapDataError(
                index, f"the rendered conversation has {len(turn_starts)} assistant turn(s), the row {wanted_turns}: "
                "check the chat template."
            )
        if prepared.kind == "messages":
            return [True] * len(ids) if self.assistant_only_loss is False else assistant
        # Conversational prompt-completion: TRL's completion is everything after the prompt rendered with the
        # generation prompt, i.e. from the first assistant turn of the completion to the end.
        prompt_turns = sum(m["role"] == "assistant" for m in prepared.messages[: prepared.num_prompt_messages])
        completion = [i >= turn_starts[prompt_turns] for i in range(len(ids))]
        mask = [True] * len(ids) if self.completion_only_loss is False else completion
        if self.assistant_only_loss:
            mask = [m and a for m, a in zip(mask, assistant)]
        return mask

    def encode_row(self, row: Mapping, index) -> dict:
        """One row -> unpadded tensors: `input_ids`, `attention_mask`, `mm_token_type_ids`, `labels` (1-D), and
        `pixel_values`, `image_grid_thw`, `aux_pixel_values`, `aux_image_grid_thw` when the row has them."""
        prepared = self.prepare_row(row, index)
        conversational = prepared.kind in ("messages", "prompt_completion")
        if conversational:
            text = self.processor.apply_chat_template(prepared.messages, tokenize=False)
        else:
            text = prepared.text
        try:
            encoded = self.processor(
                images=prepared.images or None,
                text=[text],
                aux_images=[prepared.aux_images] if prepared.aux_images else None,
                return_tensors="pt",
            )
        except Exception as error:  # the processor's own checks (marker count, image shape): name our row
            problem = re.sub(r"^Row \d+: ", "", str(error))
            raise GapDataError(index, f"the processor refused the row ({_type_name(error)}: {problem})") from error

        ids = encoded["input_ids"][0].tolist()
        mask = self._label_mask(prepared, ids, encoded)
        whole = all(mask)  # TRL's language modeling: every token is a label, image tokens included
        unsupervised = {self.latent_pad_id} if whole else self.unsupervised_ids
        labels = [t if m and t not in unsupervised else -100 for t, m in zip(ids, mask)]
        if all(label == -100 for label in labels):
            raise GapDataError(index, "no supervised token: the supervised part holds only image or latent slots.")

        length = len(ids)
        if self.max_length is not None and length > self.max_length:
            cut = [p for p in range(self.max_length, length) if ids[p] in self.protected_ids]
            if cut:  # name what the cut reaches first
                if ids[cut[0]] in self.image_ids:
                    raise GapDataError(
                        index, f"image tokens are cut by max_length={self.max_length}: the row has {length} tokens "
                        f"and image tokens at positions >= {cut[0]}. Raise max_length or use smaller images."
                    )
                raise GapDataError(
                    index, f"a latent span is cut by max_length={self.max_length}: the row has {length} tokens and "
                    f"latent tokens at positions >= {cut[0]}. Raise max_length or shorten the row."
                )
            labels = labels[: self.max_length]
            if all(label == -100 for label in labels):
                raise GapDataError(
                    index, f"max_length={self.max_length} cuts every supervised token (the row has {length} tokens)."
                )
            length = self.max_length

        out = {
            "input_ids": encoded["input_ids"][0, :length],
            "attention_mask": encoded["attention_mask"][0, :length],
            "mm_token_type_ids": encoded["mm_token_type_ids"][0, :length],
            "labels": torch.tensor(labels[:length], dtype=torch.long),
        }
        for key in ("pixel_values", "image_grid_thw", "aux_pixel_values", "aux_image_grid_thw"):
            if key in encoded:
                out[key] = encoded[key]
        return out

    # ---- a batch -------------------------------------------------------------------------------------------
    def __call__(self, rows: list[Mapping]) -> dict[str, torch.Tensor]:
        # Items of a packed dataset hold several rows: a batch of packs is the batch of all their rows.
        rows = [row for item in rows for row in (
            item[PACKED_ROWS] if isinstance(item, Mapping) and PACKED_ROWS in item else [item])]
        encoded, indices = [], []
        for position, row in enumerate(rows):
            index = row.get(ROW_INDEX_COLUMN, position) if isinstance(row, Mapping) else position
            encoded.append(self.encode_row(row, index))
            indices.append(index)
        length = max(e["input_ids"].shape[0] for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(key, value):
            return torch.stack([
                torch.nn.functional.pad(e[key], (0, length - e[key].shape[0]), value=value) for e in encoded
            ])

        if self.padding_free:
            first_label_masked = [torch.cat([e["labels"].new_full((1,), -100), e["labels"][1:]]) for e in encoded]
            batch = {
                "input_ids": torch.cat([e["input_ids"] for e in encoded])[None],
                "mm_token_type_ids": torch.cat([e["mm_token_type_ids"] for e in encoded])[None],
                "labels": torch.cat(first_label_masked)[None],
                "position_ids": torch.cat([torch.arange(e["input_ids"].shape[0]) for e in encoded])[None],
            }
        else:
            batch = {
                "input_ids": pad("input_ids", self.pad_token_id),
                "attention_mask": pad("attention_mask", 0),
                "mm_token_type_ids": pad("mm_token_type_ids", 0),
                "labels": pad("labels", -100),
            }
        for values, grid in (("pixel_values", "image_grid_thw"), ("aux_pixel_values", "aux_image_grid_thw")):
            present = [e for e in encoded if values in e]
            if present:
                batch[values] = torch.cat([e[values] for e in present])
                batch[grid] = torch.cat([e[grid] for e in present])
        if self.return_row_indices:
            batch["gap_row_indices"] = torch.tensor([i if isinstance(i, int) else -1 for i in indices])
        return batch


# ---- validating a whole dataset ----------------------------------------------------------------------------------
def _raw_rows(dataset, max_rows: int | None, chunk: int = 256) -> Iterable[tuple[int, Mapping]]:
    """(index, row) pairs; a `datasets.Dataset` is read through Arrow so that images stay undecoded bytes."""
    try:
        import datasets
    except ImportError:  # pragma: no cover
        datasets = None
    total = len(dataset) if hasattr(dataset, "__len__") else None
    if max_rows is not None and total is not None:
        total = min(total, max_rows)
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        arrow = dataset.with_format("arrow")
        for start in range(0, total, chunk):
            for offset, row in enumerate(arrow[start : min(start + chunk, total)].to_pylist()):
                yield start + offset, row
        return
    for index, row in enumerate(dataset):
        if max_rows is not None and index >= max_rows:
            return
        yield index, row


def validate_gap_dataset(
    dataset,
    processor,
    max_length: int | None = None,
    capacity_guided: bool = True,
    capacity_threshold: float = 0.5,
    max_rows: int | None = None,
    max_errors: int = 20,
    escape_special_tokens: bool = False,
    **collator_options,
) -> dict:
    """Check every row of `dataset` (a `datasets.Dataset`, an `IterableDataset` or any iterable of rows) exactly as
    `GapDataCollator` will encode it: column types, messages and roles, image placeholders, every image (and aux
    image) readable, marker / aux-image counts on the text as rendered (no marker split across parts), no special-token
    string in the text, no marker outside assistant turns, no empty assistant turn, the rendered conversation holding
    the row's assistant turns, the processor accepting the row, supervised tokens present, and no image or latent span
    cut by `max_length`. A row that passes trains as checked: the collator runs the same code.

    Returns a summary (`rows`, `rows_with_latent` (rows that keep spans), `plain_text_rows` (rows whose spans the
    capacity rule removed), `spans`, `max_tokens`). Raises `GapDatasetValidationError` listing the bad rows (up to
    `max_errors`), its message starting with the first: `Row <index>: <problem>`. `collator_options` are the other
    arguments of `GapDataCollator` that decide how a row is encoded (`assistant_only_loss`, `completion_only_loss`,
    `dataset_text_field`, `formatting_func`).
    """
    collator_options.pop("padding_free", None)  # a batch option: rows are checked one by one
    collator = GapDataCollator(
        processor, max_length=max_length, capacity_guided=capacity_guided, capacity_threshold=capacity_threshold,
        escape_special_tokens=escape_special_tokens, **collator_options,
    )
    errors, total_bad = [], 0
    summary = dict(rows=0, rows_with_latent=0, plain_text_rows=0, spans=0, max_tokens=0)
    for index, row in _raw_rows(dataset, max_rows):
        summary["rows"] += 1
        try:
            encoded = collator.encode_row(row, index)
        except GapDataError as error:
            total_bad += 1
            if len(errors) < max_errors:
                errors.append(error)
            continue
        spans = int((encoded["input_ids"] == collator.latent_start_id).sum())
        # A valid row has them in assistant turns (or its text) only.
        markers = row_markers(row, collator.marker, collator.dataset_text_field) if collator.formatting_func is None \
            else collator.formatting_func(row).count(collator.marker)
        summary["spans"] += spans
        summary["rows_with_latent"] += spans > 0
        summary["plain_text_rows"] += markers > 0 and spans == 0
        summary["max_tokens"] = max(summary["max_tokens"], int(encoded["input_ids"].shape[0]))
    if errors:
        raise GapDatasetValidationError(errors, total_bad)
    return summary


__all__ = [
    "GapDataCollator",
    "GapDataError",
    "GapDatasetValidationError",
    "PACKED_ROWS",
    "PackedRows",
    "PreparedRow",
    "ROW_INDEX_COLUMN",
    "load_image",
    "pack_rows_bfd",
    "remove_latent_markers",
    "validate_gap_dataset",
]
