"""`trainers.collator`: the collator builds GAP's inputs from rows in the spec's schema, honours capacity, and names the
row of every malformed one; `validate_gap_dataset` checks a whole dataset up front."""

import io

import datasets
import pytest
import torch

from testing_utils import COLORS, solid_image
from trainers.collator import (
    GapDataCollator,
    GapDataError,
    GapDatasetValidationError,
    remove_latent_markers,
    validate_gap_dataset,
)
from trainers.synthetic import make_synthetic_dataset, make_synthetic_rows


def row(i=0, answer="Look <|latent|> it is red.", **extra):
    """A good row: one question image, a user turn with its placeholder, one span and its aux image."""
    out = {
        "images": [solid_image(COLORS[i % 6])],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": answer},
        ],
        "aux_images": [solid_image(COLORS[(i + 1) % 6])] * answer.count("<|latent|>"),
        "answer": "red",
    }
    out.update(extra)
    return out


def decoded_labels(processor, batch, i):
    labels = batch["labels"][i]
    return processor.tokenizer.decode(labels[labels != -100])


def test_batch_inputs_labels_and_targets(tiny_gap):
    model, processor = tiny_gap
    pad_id, start_id, end_id = processor.latent_token_ids
    k = processor.num_latent_tokens
    rows = [row(0), row(1, "First <|latent|> then <|latent|> blue."), row(2, "No span here, green.")]
    batch = GapDataCollator(processor)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "mm_token_type_ids", "labels", "pixel_values",
                          "image_grid_thw", "aux_pixel_values", "aux_image_grid_thw"}
    assert (batch["input_ids"] == start_id).sum(-1).tolist() == [1, 2, 0]
    assert (batch["input_ids"] == pad_id).sum(-1).tolist() == [k, 2 * k, 0]
    assert batch["image_grid_thw"].shape[0] == 3 and batch["aux_image_grid_thw"].shape[0] == 3
    # mm_token_type_ids mark the image pads (1) and nothing else.
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_pad)
    # Right padding; labels only on the assistant text (+ <|im_end|>), latent slots masked, start/end supervised.
    assert batch["attention_mask"][2, -1] == 0 and batch["input_ids"][2, -1] == processor.tokenizer.pad_token_id
    assert decoded_labels(processor, batch, 0) == "Look <|latent_start|><|latent_end|> it is red.<|im_end|>"
    assert decoded_labels(processor, batch, 2) == "No span here, green.<|im_end|>"
    labels = batch["labels"]
    assert not ((labels == pad_id) | (labels == image_pad)).any()
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    # The model takes the batch as it is; one target set per span.
    with torch.no_grad():
        out = model(**batch)
    assert out.latent_targets.shape == (3, k, model.config.text_config.hidden_size)
    assert torch.isfinite(out.loss)


def test_string_contents_get_image_placeholders(tiny_gap):
    _, processor = tiny_gap
    plain = row(0)
    plain["messages"] = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}]
    plain["aux_images"] = []
    batch = GapDataCollator(processor)([plain])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "<|im_start|>user\n<|vision_start|><|image_pad|>" in text  # TRL's convention: images open the user turn
    assert decoded_labels(processor, batch, 0) == "Red.<|im_end|>"


def test_removed_markers_join_the_text_around_them():
    assert remove_latent_markers("Look closer. <|latent|> It reads EXIT.") == "Look closer. It reads EXIT."
    assert remove_latent_markers("Look.<|latent|>It reads") == "Look. It reads"
    assert remove_latent_markers("Look.\n<|latent|>\nIt reads") == "Look.\nIt reads"
    assert remove_latent_markers("Look. <|latent|>\n\nIt reads") == "Look.\n\nIt reads"
    assert remove_latent_markers("<|latent|> It is red.") == "It is red."
    assert remove_latent_markers("It is red. <|latent|>") == "It is red."
    assert remove_latent_markers("a <|latent|> <|latent|> b") == "a b"


def test_capacity_selection(tiny_gap):
    model, processor = tiny_gap
    start_id = processor.latent_token_ids[1]
    rows = [
        row(0, use_latent=True),
        row(1, use_latent=False),
        row(2, base_pass_rate=0.25),  # hard for the base: keeps the span
        row(3, base_pass_rate=0.75),  # easy: plain text
        row(4, use_latent=False, base_pass_rate=0.0),  # use_latent wins
    ]
    guided = GapDataCollator(processor, capacity_guided=True, capacity_threshold=0.5)(rows)
    assert (guided["input_ids"] == start_id).sum(-1).tolist() == [1, 0, 1, 0, 0]
    assert guided["aux_image_grid_thw"].shape[0] == 2
    assert decoded_labels(processor, guided, 1) == "Look it is red.<|im_end|>"
    assert GapDataCollator(processor, capacity_threshold=0.8)(rows[3:4])["input_ids"].eq(start_id).sum() == 1

    unguided = GapDataCollator(processor, capacity_guided=False)(rows)
    assert (unguided["input_ids"] == start_id).sum(-1).tolist() == [1, 1, 1, 1, 1]
    assert unguided["aux_image_grid_thw"].shape[0] == 5

    # Easy rows add no latent loss: the batch's latent loss is that of its kept rows alone.
    with torch.no_grad():
        mixed = model(**GapDataCollator(processor)([rows[0], rows[1]]))
        alone = model(**GapDataCollator(processor)([rows[0]]))
        easy = model(**GapDataCollator(processor)([rows[1], rows[3]]))
    assert torch.allclose(mixed.latent_loss, alone.latent_loss, atol=1e-6)
    assert easy.latent_loss is None


def test_max_length_cuts_text_after_the_last_span(tiny_gap):
    _, processor = tiny_gap
    good = row(0, "Look <|latent|> it is red, and a long description follows here.")
    full = GapDataCollator(processor)([good])["input_ids"].shape[1]
    cut = GapDataCollator(processor, max_length=full - 10)([good])
    assert cut["input_ids"].shape[1] == full - 10
    assert (cut["input_ids"] == processor.latent_token_ids[2]).sum() == 1


# ---- malformed rows: one case per class; the bad row sits at index 2 of the batch ----------------------------------
def _span_end_length(processor):
    ids = GapDataCollator(processor)([row(0)])["input_ids"][0].tolist()
    return ids.index(processor.latent_token_ids[0]) + 1  # cuts inside the span


def _image_cut_length(processor):
    ids = GapDataCollator(processor)([row(0)])["input_ids"][0].tolist()
    return ids.index(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")) + 1


BAD_ROWS = {
    "missing image": (lambda r: r.update(images=[None]), "image 0 is missing"),
    "missing image file": (lambda r: r.update(images=["/nonexistent/board.png"]), "image 0 is missing: file not found"),
    "unreadable image": (lambda r: r.update(images=[{"bytes": b"not a png", "path": None}]), "image 0 cannot be read"),
    "missing aux image": (lambda r: r.update(aux_images=[None]), "aux image 0 is missing"),
    "too few aux images": (lambda r: r.update(aux_images=[]), "1 <|latent|> marker(s) but 0 aux image(s)"),
    "too many aux images": (lambda r: r.update(aux_images=[solid_image(COLORS[0])] * 2), "but 2 aux image(s)"),
    "marker in the user turn": (
        lambda r: r["messages"][0]["content"].append({"type": "text", "text": "<|latent|>"}), "belong in assistant"
    ),
    "image placeholders": (
        lambda r: r["messages"][0]["content"].insert(0, {"type": "image"}), "2 image placeholder(s) but the row has 1"
    ),
    "empty assistant turn": (
        lambda r: r.update(aux_images=[]) or r["messages"][1].update(content="  "), "empty assistant turn"
    ),
    "assistant turn with a span only": (lambda r: r["messages"][1].update(content=" <|latent|> "), "empty assistant"),
    "no assistant turn": (lambda r: r["messages"].pop(), "no assistant turn"),
    "messages not a list": (lambda r: r.update(messages="What colour?"), "messages must be a non-empty list"),
    "content of a wrong type": (lambda r: r["messages"][1].update(content=42), "content of type int"),
    "unknown role": (lambda r: r["messages"][1].update(role="bot"), "role 'bot'"),
    "images not a list": (lambda r: r.update(images=solid_image(COLORS[0])), "images must be a list"),
    "use_latent not a bool": (lambda r: r.update(use_latent="yes"), "use_latent must be a bool"),
    "base_pass_rate out of range": (
        lambda r: r.update(base_pass_rate=1.5), "base_pass_rate must be a number in [0, 1]"
    ),
    "answer not a string": (lambda r: r.update(answer=3), "answer must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_each_malformed_row_class_names_the_row(tiny_gap, case):
    _, processor = tiny_gap
    mutate, expected = BAD_ROWS[case]
    rows = [row(0), row(1), row(2), row(3)]
    mutate(rows[2])
    with pytest.raises(GapDataError) as info:
        GapDataCollator(processor)(rows)
    assert str(info.value).startswith("Row 2: "), str(info.value)
    assert expected in str(info.value)
    assert info.value.index == 2


@pytest.mark.parametrize("what", ["latent span", "image tokens"])
def test_a_cut_span_or_image_names_the_row(tiny_gap, what):
    _, processor = tiny_gap
    length = _span_end_length(processor) if what == "latent span" else _image_cut_length(processor)
    short = {"messages": [{"role": "system", "content": "."}, {"role": "user", "content": "?"},
                          {"role": "assistant", "content": "Red."}]}
    assert GapDataCollator(processor)([short])["input_ids"].shape[1] < length
    expected = "a latent span is" if what == "latent span" else "image tokens are"
    with pytest.raises(GapDataError, match=rf"^Row 2: {expected} cut by max_length={length}"):
        GapDataCollator(processor, max_length=length)([short, short, row(2)])
    # The collator names dataset indices when the rows carry them (GapSFTTrainer adds the column).
    with pytest.raises(GapDataError, match=r"^Row 17: "):
        GapDataCollator(processor, max_length=length)([{**row(0), "gap_row_index": 17}])


def _features(with_use_latent=False):
    features = {
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "aux_images": datasets.List(datasets.Image()),
        "answer": datasets.Value("string"),
    }
    if with_use_latent:
        features["use_latent"] = datasets.Value("bool")
    return datasets.Features(features)


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_validate_reports_bad_rows_of_a_dataset(tiny_gap):
    _, processor = tiny_gap
    n = 6
    columns = dict(
        images=[[{"bytes": _png_bytes(solid_image(COLORS[i])), "path": None}] for i in range(n)],
        messages=[[{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Look <|latent|> red."}]
                  for _ in range(n)],
        aux_images=[[solid_image(COLORS[i])] for i in range(n)],
        answer=["red"] * n,
    )
    columns["images"][3] = [{"bytes": b"\x89PNG broken", "path": None}]  # unreadable: decoding would fail in the loader
    columns["aux_images"][5] = []  # marker without aux image
    dataset = datasets.Dataset.from_dict(columns, features=_features())
    with pytest.raises(GapDatasetValidationError) as info:
        validate_gap_dataset(dataset, processor)
    assert str(info.value).startswith("Row 3: image 0 cannot be read")
    assert [e.index for e in info.value.errors] == [3, 5]
    assert "Row 5: 1 <|latent|> marker(s) but 0 aux image(s)" in str(info.value)

    good = dataset.select([0, 1, 2, 4])
    summary = validate_gap_dataset(good, processor)
    assert summary["rows"] == 4 and summary["spans"] == 4 and summary["rows_with_latent"] == 4


def test_validate_counts_capacity(tiny_gap):
    _, processor = tiny_gap
    dataset = make_synthetic_dataset(12, seed=3, use_latent_fraction=0.5)
    kept = sum(dataset["use_latent"])
    assert 0 < kept < 12
    summary = validate_gap_dataset(dataset, processor)
    assert summary == dict(rows=12, rows_with_latent=kept, plain_text_rows=12 - kept, spans=kept,
                           max_tokens=summary["max_tokens"])
    assert validate_gap_dataset(dataset, processor, capacity_guided=False)["spans"] == 12


def test_synthetic_task_is_consistent():
    rows = make_synthetic_rows(8, seed=1, image_size=56, grid=2, num_colors=3)
    again = make_synthetic_rows(8, seed=1, image_size=56, grid=2, num_colors=3)
    assert [r["answer"] for r in rows] == [r["answer"] for r in again]
    from trainers.synthetic import COLORS as PALETTE

    for r in rows:
        assistant = r["messages"][1]["content"][0]["text"]
        assert assistant.count("<|latent|>") == len(r["aux_images"]) == 1
        assert assistant.endswith(f"Answer: {r['answer']}")
        # The aux crop is the evidence: its centre pixel has the answer's colour.
        crop = r["aux_images"][0]
        assert crop.getpixel((crop.size[0] // 2, crop.size[1] // 2)) == PALETTE[r["answer"]]


# ---- text as the chat template renders it --------------------------------------------------------------------------
@pytest.mark.parametrize("role,token", [("user", "<|im_end|>\n<|im_start|>assistant\n"), ("assistant", "<|im_end|>"),
                                        ("assistant", "<|latent_end|>"), ("assistant", "<|vision_start|>"),
                                        ("user", "<|latent_start|>"), ("system", "<|endoftext|>")])
def test_a_special_token_typed_in_text_is_refused_naming_row_message_token_and_fix(tiny_gap, role, token):
    _, processor = tiny_gap
    bad = row(0)
    turn = {"user": 0, "assistant": 1}.get(role)
    if role == "system":
        bad["messages"].insert(0, {"role": "system", "content": f"Be brief. {token}"})
        turn = 0
    elif role == "user":
        bad["messages"][turn]["content"][-1]["text"] += f" {token} more"
    else:
        bad["messages"][turn]["content"] += f" {token} more"
    with pytest.raises(GapDatasetValidationError) as error:
        validate_gap_dataset([row(1), bad], processor)
    message = str(error.value)
    assert message.startswith(f"Row 1: message {turn} ({role}) contains the special token {token.split(chr(10))[0]!r}")
    assert "escape_special_tokens=True" in message


def test_escaping_trains_a_typed_special_token_as_plain_text(tiny_gap):
    _, processor = tiny_gap
    typed = row(0, answer="The tag <|im_end|> is text here. <|latent|> Red.")
    collator = GapDataCollator(processor, escape_special_tokens=True)
    batch = collator([typed])
    ids = batch["input_ids"][0].tolist()
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 3  # system, user and assistant turn ends: none from the text
    labels = decoded_labels(processor, batch, 0)
    assert "The tag <\u2060|im_end|> is text here." in labels and labels.endswith("Red.<|im_end|>")


def test_a_marker_split_across_text_parts_is_refused_and_plain_text_removal_sees_joined_text(tiny_gap):
    _, processor = tiny_gap
    split = row(0)
    split["messages"][1]["content"] = [{"type": "text", "text": "Look <|lat"}, {"type": "text", "text": "ent|> red."}]
    with pytest.raises(GapDatasetValidationError, match=r"^Row 0: message 1 \(assistant\): a <\|latent\|> marker is "
                                                        r"split across two text parts"):
        validate_gap_dataset([split], processor)
    parts = row(0)
    parts["messages"][1]["content"] = [{"type": "text", "text": "Look."}, {"type": "text", "text": " <|latent|> Red."}]
    parts["use_latent"] = False
    batch = GapDataCollator(processor)([parts])
    assert decoded_labels(processor, batch, 0) == "Look. Red.<|im_end|>"  # as the joined text would read
