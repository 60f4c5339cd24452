"""GAP's dataset schema (GAP_SPEC.md section 7): the columns of a row, the features of a converted dataset, and the
text of its messages.

A row: `images` (list of images), `messages` (`[{"role", "content"}]`, content a string or a list of
`{"type": "image"}` / `{"type": "text", "text": ...}` parts) with `<|latent|>` markers in the assistant text,
`aux_images` (one per marker, in order), `answer`, and optionally `use_latent` (bool) and `base_pass_rate` (float in
[0, 1], written by capacity assignment).

TRL's other dataset formats are rows too (`row_format` tells them apart, in TRL's order of precedence):
- conversational prompt-completion: `prompt` (the user turns) and `completion` (the assistant turn, with the span
  markers; its aux images in `aux_images`), both lists of messages;
- plain text (language modeling): a string column (`text`, TRL's `dataset_text_field`), or string `prompt` and
  `completion`; trained as text SFT (no chat template, no span unless the text carries a marker).
"""

import re
from collections.abc import Mapping

from modeling_gap.configuration_gap import LATENT_MARKER

ROLES = ("system", "user", "assistant")
REQUIRED_COLUMNS = ("images", "messages", "aux_images", "answer")
CAPACITY_COLUMNS = ("use_latent", "base_pass_rate")


def gap_features():
    """The `datasets.Features` of a converted dataset (the capacity columns are added by capacity assignment)."""
    from datasets import Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string")}
    return Features(
        {
            "images": List(Image()),
            "messages": List({"role": Value("string"), "content": List(part)}),
            "aux_images": List(Image()),
            "answer": Value("string"),
            "source_index": Value("int64"),
        }
    )


def content_text(content) -> str:
    """The text of one message's content (a string, or the text parts of a list joined as the chat template does)."""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text") or "") for part in content or []
                   if isinstance(part, Mapping) and part.get("type", "text") == "text")


def turn_texts(messages, role: str) -> list[str]:
    """The text of every turn of `role`, in order."""
    return [content_text(m.get("content")) for m in messages or [] if isinstance(m, Mapping) and m.get("role") == role]


def assistant_text(messages) -> str:
    """All assistant text of a row, one turn per line."""
    return "\n".join(turn_texts(messages, "assistant"))


def user_question(messages) -> str:
    """The question of a row: the text of its first user turn, stripped; "" when there is none."""
    texts = turn_texts(messages, "user")
    return texts[0].strip() if texts else ""


def count_markers(messages, marker: str = LATENT_MARKER) -> int:
    """`<|latent|>` markers in the assistant text of a row (the number of aux images it needs)."""
    return assistant_text(messages).count(marker)


ROW_FORMATS = ("messages", "prompt_completion", "text", "prompt_completion_text")


def row_format(row: Mapping, text_field: str = "text") -> str | None:
    """Which of TRL's dataset formats `row` is in: `"messages"` (conversational), `"prompt_completion"`
    (conversational `prompt` / `completion` message lists), `"text"` (a string in `text_field`),
    `"prompt_completion_text"` (string `prompt` / `completion`), or None. `messages` wins over the others and a
    text field over string prompt-completion, as in TRL's collators."""
    if row.get("messages") is not None:
        return "messages"
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        return "prompt_completion"
    if isinstance(row.get(text_field), str):
        return "text"
    if isinstance(prompt, str) and isinstance(completion, str):
        return "prompt_completion_text"
    return None


def row_messages(row: Mapping) -> list:
    """The conversation of a conversational row: `messages`, or `prompt` + `completion`; [] for text rows."""
    if row.get("messages") is not None:
        return list(row["messages"])
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        return list(prompt) + list(completion)
    return []


def row_markers(row: Mapping, marker: str = LATENT_MARKER, text_field: str = "text") -> int:
    """`<|latent|>` markers of a row in any format: in its assistant turns, or in the text of a text row."""
    kind = row_format(row, text_field)
    if kind == "text":
        return row[text_field].count(marker)
    if kind == "prompt_completion_text":
        return row["completion"].count(marker)
    return count_markers(row_messages(row), marker)


def remove_latent_markers(text: str, marker: str = LATENT_MARKER) -> str:
    """Remove the latent-span markers from `text`, joining the text around each.

    A marker (or a run of markers) together with the whitespace on both sides of it becomes one separator: the
    whitespace before it if that holds a line break, else the whitespace after it if that holds one, else a single
    space. At the start or the end of `text` it leaves nothing. So `"Look closer. <|latent|> It reads EXIT."` becomes
    `"Look closer. It reads EXIT."`, `"Look.<|latent|>It reads"` becomes `"Look. It reads"`, and
    `"Look.\\n<|latent|>\\nIt reads"` becomes `"Look.\\nIt reads"`.
    """
    escaped = re.escape(marker)
    pattern = re.compile(r"(\s*)" + escaped + r"(?:\s*" + escaped + r")*(\s*)")

    def join(match):
        if match.start() == 0 or match.end() == len(text):
            return ""
        before, after = match.group(1), match.group(2)
        if "\n" in before:
            return before
        if "\n" in after:
            return after
        return " "

    return pattern.sub(join, text)


__all__ = [
    "CAPACITY_COLUMNS",
    "LATENT_MARKER",
    "REQUIRED_COLUMNS",
    "ROLES",
    "ROW_FORMATS",
    "assistant_text",
    "content_text",
    "count_markers",
    "gap_features",
    "remove_latent_markers",
    "row_format",
    "row_markers",
    "row_messages",
    "turn_texts",
    "user_question",
]
