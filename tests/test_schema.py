"""`trainers.schema`: the text of a row's messages as the chat template joins it, marker counting and removal."""

from trainers.schema import (
    LATENT_MARKER,
    assistant_text,
    content_text,
    count_markers,
    remove_latent_markers,
    user_question,
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": " Which "},
                                 {"type": "text", "text": "colour?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": f"Look {LATENT_MARKER}"}, {"type": "text", "text": " red."}]},
    {"role": "user", "content": "Sure?"},
    {"role": "assistant", "content": f"{LATENT_MARKER} Yes."},
]


def test_text_of_messages_joins_parts_as_the_template_does():
    assert content_text(MESSAGES[1]["content"]) == " Which colour?"
    assert user_question(MESSAGES) == "Which colour?"  # the first user turn, stripped
    assert assistant_text(MESSAGES) == f"Look {LATENT_MARKER} red.\n{LATENT_MARKER} Yes."
    assert count_markers(MESSAGES) == 2
    assert user_question([{"role": "assistant", "content": "x"}]) == ""


def test_removing_markers_joins_the_text_around_them():
    assert remove_latent_markers(f"Look closer. {LATENT_MARKER} It reads EXIT.") == "Look closer. It reads EXIT."
    assert remove_latent_markers(f"Look.{LATENT_MARKER}It reads") == "Look. It reads"
    assert remove_latent_markers(f"Look.\n{LATENT_MARKER}\nIt reads") == "Look.\nIt reads"
    assert remove_latent_markers(f"{LATENT_MARKER} {LATENT_MARKER} Start") == "Start"
