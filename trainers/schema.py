"""GAP's dataset schema (GAP_SPEC.md section 7): the columns of a row, the features of a converted dataset, and the
text of its messages.

A row: `images` (list of images), `messages` (`[{"role", "content"}]`, content a string or a list of
`{"type": "image"}` / `{"type": "text", "text": ...}` parts) with `<|latent|>` markers in the assistant text,
`aux_images` (one per marker, in order), `answer`, and optionally `use_latent` (bool) and `base_pass_rate` (float in
[0, 1], written by capacity assignment).
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
    "assistant_text",
    "content_text",
    "count_markers",
    "gap_features",
    "remove_latent_markers",
    "turn_texts",
    "user_question",
]
