"""`trainers.dataset_conversion` (`gap convert`): Monet, Mirage and LVR rows become GAP rows that load, pass the processor and the model.

Each format has a hand-written fixture with good rows and at least one bad row of every kind that format can skip.
"""

import io
import json
import math

import pytest
import torch
from PIL import Image

from trainers.cli import run_stage
from trainers.dataset_conversion import (
    LATENT_MARKER,
    REPORT_NAME,
    SKIP_REASONS,
    ConversionError,
    convert_lvr,
    convert_mirage,
    convert_monet,
    extract_answer,
    load_rows,
    records_to_dataset,
)
from trainers.schema import gap_features


def gradient(width, height, seed=0):
    """An RGB image whose every pixel differs from its neighbours, so crops are recognisable."""
    image = Image.new("RGB", (width, height))
    image.putdata([((3 * x + seed) % 256, (5 * y + 7 * seed) % 256, (x * y + seed) % 256)
                   for y in range(height) for x in range(width)])
    return image


def write_images(root):
    root.mkdir(parents=True, exist_ok=True)
    gradient(80, 60, 0).save(root / "q0.png")
    gradient(64, 64, 1).save(root / "q1.png")
    gradient(40, 40, 2).save(root / "h0.png")
    gradient(48, 32, 3).save(root / "h1.png")
    gradient(402, 60, 4).save(root / "wide.png")  # its 1-pixel-high box crop is too elongated
    gradient(300, 1, 5).save(root / "thin.png")  # too elongated itself
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures in the three formats: (rows, expected reason per row; None = converted)
# ---------------------------------------------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}


def monet_row(question_image="q0.png", assistant=None, user_text="What does the sign say?", metadata=None):
    user = {"role": "user",
            "content": [{"type": "image", "image": question_image}, {"type": "text", "text": user_text}]}
    assistant = assistant if assistant is not None else [
        {"type": "text", "text": "I need a closer look at the sign.<abs_vis_token></abs_vis_token>"},
        {"type": "image", "image": "h0.png"},
        {"type": "text", "text": "<observation>It reads EXIT.</observation> So the answer is \\boxed{EXIT}."},
    ]
    return {"data": [SYSTEM, user, {"role": "assistant", "content": assistant}],
            "metadata": metadata or {"sample_id": 0, "dataset_name": "fixture"}}


def monet_fixture():
    two_spans = [
        {"type": "text", "text": "First the left part.<abs_vis_token></abs_vis_token>"},
        {"type": "image", "image": "h0.png"},
        {"type": "text",
         "text": "<observation>A red square.</observation> Then the right.<abs_vis_token></abs_vis_token>"},
        {"type": "image", "image": "h1.png"},
        {"type": "text", "text": "A blue circle. \\boxed{\\frac{1}{2}}"},
    ]
    return [
        (monet_row(), None),
        (monet_row("q1.png", two_spans), None),
        (monet_row(assistant=[{"type": "text", "text": "Plain text, no span and no boxed answer."}]), None),
        (monet_row("missing.png"), "missing_image"),
        (monet_row("broken.png"), "unreadable_image"),
        (monet_row(assistant=[{"type": "text", "text": "Look.<abs_vis_token></abs_vis_token> done"}]),
         "marker_aux_mismatch"),  # a span without a helper image
        (monet_row(assistant=[{"type": "text", "text": "Look."}, {"type": "image", "image": "h0.png"}]),
         "marker_aux_mismatch"),  # a helper image after text without a span
        (monet_row(user_text="Use <abs_vis_token></abs_vis_token> here?"), "marker_aux_mismatch"),
        ({"data": [SYSTEM, monet_row()["data"][1]], "metadata": {}}, "no_assistant_turn"),
        ({"metadata": {"sample_id": 8}}, "malformed_row"),
        (monet_row(user_text=f"Is {LATENT_MARKER} a token?"), "reserved_marker"),
        (monet_row("thin.png"), "bad_image_shape"),
    ]


def mirage_fixture():
    return [
        ({"text_input": "<image>\nWhat colour is the square?", "image_input": ["q0.png"],
          "text_output": "Let me picture the square. <output_image> It is red. <answer>red</answer>",
          "image_output": "h0.png"}, None),
        ({"text_input": "Which shape is larger?", "image_input": "q1.png",
          "text_output": "The circle. \\boxed{circle}", "image_output": ["h1.png"], "answer": "circle"}, None),
        ({"text_input": "<image> Count the dots.", "image_input": ["q0.png"], "text_output": "Three.",
          "image_output": None}, None),
        ("{not json", "malformed_json"),
        ({"text_input": "<image> no output", "image_input": ["q0.png"]}, "malformed_row"),
        ({"text_input": "<image> Q?", "image_input": ["q0.png"], "text_output": "<output_image> A",
          "image_output": "missing.png"}, "missing_image"),
        ({"text_input": "<image> Q?", "image_input": ["broken.png"], "text_output": "<output_image> A",
          "image_output": "h0.png"}, "unreadable_image"),
        ({"text_input": "<image><image> Q?", "image_input": ["q0.png"], "text_output": "<output_image> A",
          "image_output": "h0.png"}, "image_placeholder_mismatch"),
        ({"text_input": "<image> Q?", "image_input": ["q0.png"], "text_output": "<output_image> A <output_image>",
          "image_output": "h0.png"}, "marker_aux_mismatch"),
        ({"text_input": "<image> Q? <output_image>", "image_input": ["q0.png"], "text_output": "<output_image> A",
          "image_output": "h0.png"}, "marker_aux_mismatch"),
        ({"text_input": "<image> Q?", "image_input": ["q0.png"], "text_output": "  ", "image_output": None},
         "no_assistant_turn"),
        ({"text_input": "<image> Q?", "image_input": ["q0.png"], "text_output": f"{LATENT_MARKER} A",
          "image_output": "h0.png"}, "reserved_marker"),
        ({"text_input": "<image> Q?", "image_input": ["q0.png"], "text_output": "<output_image> A",
          "image_output": "thin.png"}, "bad_image_shape"),
    ]


def lvr_row(image=("q0.png",), human="<image>\nWhat is written on the sign?", gpt="<lvr>\n<answer> EXIT </answer>",
            boxes=((0.25, 0.1, 0.75, 0.6),)):
    row = {"image": list(image) if isinstance(image, tuple) else image,
           "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
           "bboxes": [list(b) for b in boxes]}
    return row


def lvr_fixture():
    return [
        (lvr_row(), None),
        (lvr_row("q1.png", "Where are the two marks?", "<lvr> left, then <lvr> right. <answer>both</answer>",
                 ((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0))), None),
        ({"image": ["q0.png"], "bboxes": [[0, 0, 1, 1]]}, "malformed_row"),
        ({"image": ["q0.png"], "conversations": [{"from": "human", "value": "<image> Q?"}], "bboxes": []},
         "no_assistant_turn"),
        (lvr_row(("missing.png",)), "missing_image"),
        (lvr_row(("broken.png",)), "unreadable_image"),
        (lvr_row(human="<image><image> Q?"), "image_placeholder_mismatch"),
        (lvr_row(boxes=((0.1, 0.1, 0.4, 0.4), (0.5, 0.5, 0.9, 0.9))), "marker_aux_mismatch"),
        (lvr_row(human="<image>\nWhat is written? <lvr>", gpt="<answer>EXIT</answer>"), "marker_aux_mismatch"),
        (lvr_row(boxes=((0.5, 0.2, 0.4, 0.9),)), "bad_box"),  # empty: x1 > x2
        (lvr_row(boxes=((0.1, 0.1, 1.3, 0.5),)), "bad_box"),  # outside [0, 1]
        (lvr_row(boxes=(("a", 0, 1, 1),)), "bad_box"),  # not numbers
        (lvr_row(human=f"<image> What is {LATENT_MARKER}?"), "reserved_marker"),
        (lvr_row(("wide.png",), boxes=((0.0, 0.0, 1.0, 0.0125),)), "bad_image_shape"),  # crop 402 x 1
    ]


FIXTURES = {"monet": monet_fixture, "mirage": mirage_fixture, "lvr": lvr_fixture}
CONVERTERS = {"monet": convert_monet, "mirage": convert_mirage, "lvr": convert_lvr}


def write_input(tmp_path, format):
    """Images under tmp_path/images, the rows as the format's file: (input path, image root, fixture)."""
    root = write_images(tmp_path / "images")
    fixture = FIXTURES[format]()
    if format == "mirage":
        path = tmp_path / "train.jsonl"
        path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row, _ in fixture) + "\n")
    else:
        path = tmp_path / "train.json"
        path.write_text(json.dumps([row for row, _ in fixture], indent=1))
    return path, root, fixture


def convert_cli(tmp_path, format, *extra):
    path, root, fixture = write_input(tmp_path, format)
    output = tmp_path / f"{format}-gap"
    report = run_stage("convert", ["--format", format, "--input", str(path), "--image-root", str(root), "--output", str(output),
                   *extra])
    return output, report, fixture


def texts(message):
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def assistant_text(row):
    return "".join(texts(m) for m in row["messages"] if m["role"] == "assistant")


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["monet", "mirage", "lvr"])
def test_cli_converts_loads_and_reports_every_skip(tmp_path, format):
    from datasets import load_from_disk

    output, report, fixture = convert_cli(tmp_path, format)
    expected_reasons = {}
    for index, (_, reason) in enumerate(fixture):
        if reason:
            expected_reasons.setdefault(reason, []).append(index)
    good = [index for index, (_, reason) in enumerate(fixture) if reason is None]

    # The report: every input row is either converted or skipped for exactly one named reason.
    on_disk = json.loads((output / REPORT_NAME).read_text())
    assert on_disk == report
    assert report["rows_in"] == len(fixture)
    assert report["rows_converted"] + sum(e["count"] for e in report["skipped"].values()) == report["rows_in"]
    assert {reason: entry["rows"] for reason, entry in report["skipped"].items()} == expected_reasons
    assert set(report["skipped"]) <= set(SKIP_REASONS)
    for entry in report["skipped"].values():
        assert entry["count"] == len(entry["rows"]) and len(entry["details"]) == entry["count"]

    dataset = load_from_disk(str(output))  # the report inside the folder does not disturb loading
    assert dataset.features == gap_features()
    assert dataset["source_index"] == good
    for row in dataset:
        text = assistant_text(row)
        assert text.count(LATENT_MARKER) == len(row["aux_images"])
        image_parts = sum(p["type"] == "image" for m in row["messages"] for p in m["content"])
        assert image_parts == len(row["images"]) >= 1
        assert all(isinstance(image, Image.Image) for image in row["images"] + row["aux_images"])
        assert row["messages"][-1]["role"] == "assistant"
        for foreign in ("<abs_vis_token>", "</abs_vis_token>", "<output_image>", "<lvr>", "<image>"):
            assert all(foreign not in texts(m) for m in row["messages"])
    assert sum(len(row["aux_images"]) for row in dataset) >= 2


def test_monet_keeps_observation_text_after_the_marker(tmp_path):
    from datasets import load_from_disk

    output, report, _ = convert_cli(tmp_path, "monet")
    dataset = load_from_disk(str(output))
    first, second, plain = dataset[0], dataset[1], dataset[2]
    assert assistant_text(first) == (
        "I need a closer look at the sign.<|latent|>It reads EXIT. So the answer is \\boxed{EXIT}.")
    assert assistant_text(second).index("A red square.") > assistant_text(second).index(LATENT_MARKER)
    assert "<observation>" not in assistant_text(second)
    assert [first["answer"], second["answer"], plain["answer"]] == ["EXIT", "\\frac{1}{2}", ""]
    assert report["rows_without_answer"] == {"count": 1, "rows": [2]}
    # Helper images in order, bytes as on disk.
    images = tmp_path / "images"
    assert [im.size for im in second["aux_images"]] == [Image.open(images / name).size for name in ("h0.png", "h1.png")]
    assert list(second["aux_images"][1].convert("RGB").getdata()) == list(Image.open(images / "h1.png").getdata())
    assert first["messages"][0] == SYSTEM
    assert first["messages"][1]["content"] == [{"type": "image", "text": None},
                                               {"type": "text", "text": "What does the sign say?"}]

    kept, _ = convert_monet([row for row, _ in monet_fixture()[:1]], images, keep_observation_tags=True)
    assert "<observation>It reads EXIT.</observation>" in texts(kept[0]["messages"][-1])

    # As in Monet's collator, spans and helper images pair up in order, also two spans in one text item.
    both = [{"type": "text", "text": "Left <abs_vis_token></abs_vis_token> right <abs_vis_token></abs_vis_token>"},
            {"type": "image", "image": "h1.png"}, {"type": "image", "image": "h0.png"},
            {"type": "text", "text": " done"}]
    (record,), skipped = convert_monet([monet_row(assistant=both)], images)
    assert skipped == [] and texts(record["messages"][-1]) == "Left <|latent|> right <|latent|> done"
    sizes = [Image.open(io.BytesIO(aux["bytes"])).size for aux in record["aux_images"]]
    assert sizes == [(48, 32), (40, 40)]


def test_lvr_aux_image_is_the_crop_of_the_box(tmp_path):
    from datasets import load_from_disk

    output, _, _ = convert_cli(tmp_path, "lvr")
    dataset = load_from_disk(str(output))
    source = Image.open(tmp_path / "images" / "q0.png").convert("RGB")
    row = dataset[0]
    # Box (0.25, 0.1, 0.75, 0.6) of an 80 x 60 image: pixels x 20..60, y 6..36.
    expected = source.crop((20, 6, 60, 36))
    crop = row["aux_images"][0].convert("RGB")
    assert crop.size == (40, 30)
    assert list(crop.getdata()) == list(expected.getdata())
    assert row["answer"] == "EXIT"
    assert assistant_text(row) == "<|latent|>\n<answer> EXIT </answer>"
    assert row["messages"][0]["content"] == [{"type": "image", "text": None},
                                             {"type": "text", "text": "What is written on the sign?"}]
    two = dataset[1]  # no <image> placeholder: the image opens the user turn; two boxes, two crops, in order
    assert two["messages"][0]["content"][0] == {"type": "image", "text": None}
    q1 = Image.open(tmp_path / "images" / "q1.png").convert("RGB")
    assert [list(a.convert("RGB").getdata()) for a in two["aux_images"]] == [
        list(q1.crop((0, 0, 32, 32)).getdata()), list(q1.crop((32, 32, 64, 64)).getdata())]


def test_mirage_rows(tmp_path):
    root = write_images(tmp_path / "images")
    rows = [row for row, _ in mirage_fixture()[:3]]
    records, skipped = convert_mirage(rows, root)
    assert skipped == []
    first, second, plain = records
    assert texts(first["messages"][1]) == "Let me picture the square. <|latent|> It is red. <answer>red</answer>"
    assert first["messages"][0]["content"] == [{"type": "image", "text": None},
                                               {"type": "text", "text": "What colour is the square?"}]
    assert texts(second["messages"][1]) == "<|latent|>The circle. \\boxed{circle}"  # no <output_image>: span first
    assert second["messages"][0]["content"][0] == {"type": "image", "text": None}  # no <image>: image first
    assert [first["answer"], second["answer"], plain["answer"]] == ["red", "circle", ""]
    assert (len(first["aux_images"]), len(second["aux_images"]), len(plain["aux_images"])) == (1, 1, 0)
    dataset = records_to_dataset(records)
    assert dataset[0]["aux_images"][0].size == (40, 40)


@pytest.mark.parametrize("format", ["monet", "mirage", "lvr"])
def test_strict_raises_naming_the_first_bad_row(tmp_path, format):
    first_bad = next(index for index, (_, reason) in enumerate(FIXTURES[format]()) if reason)
    reason = FIXTURES[format]()[first_bad][1]
    with pytest.raises(ConversionError, match=rf"^Row {first_bad}: {reason}: "):
        convert_cli(tmp_path, format, "--strict")
    # The Python API too.
    path, root, fixture = write_input(tmp_path / "api", format)
    rows = [row for row, _ in fixture]
    if format == "mirage":
        rows = load_rows(str(path))
    with pytest.raises(ConversionError) as error:
        CONVERTERS[format](rows, root, strict=True)
    assert (error.value.index, error.value.reason) == (first_bad, reason)


def test_require_answer_skips_rows_without_one(tmp_path):
    output, report, fixture = convert_cli(tmp_path, "monet", "--require_answer")
    assert report["skipped"]["no_answer"]["rows"] == [2]
    assert report["rows_without_answer"]["count"] == 0
    assert report["rows_converted"] + sum(e["count"] for e in report["skipped"].values()) == len(fixture)


def test_existing_output_needs_overwrite(tmp_path):
    convert_cli(tmp_path, "mirage")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_cli(tmp_path, "mirage")
    _, report, _ = convert_cli(tmp_path, "mirage", "--overwrite")
    assert report["rows_converted"] == 3


def test_extract_answer():
    assert extract_answer("x <answer> 42 </answer> y <answer>7</answer>") == "7"
    assert extract_answer("so \\boxed{\\frac{1}{2}} and") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{a} then \\boxed{b}") == "b"
    assert extract_answer("no answer here") == extract_answer("\\boxed{unclosed") == ""


def test_converted_rows_pass_the_processor_and_the_model(tmp_path, tiny_gap):
    from datasets import load_from_disk

    model, processor = tiny_gap
    processor.tokenizer.padding_side = "right"
    for format in ("monet", "mirage", "lvr"):
        output, _, _ = convert_cli(tmp_path / format, format)
        dataset = load_from_disk(str(output))
        latent_rows = [row for row in dataset if row["aux_images"]]
        assert latent_rows
        for row in latent_rows:
            text = processor.apply_chat_template(row["messages"], tokenize=False)
            assert text.count(LATENT_MARKER) == len(row["aux_images"])
            batch = processor(images=row["images"], text=[text], aux_images=[row["aux_images"]], return_tensors="pt")
            spans = (batch["input_ids"] == model.config.latent_start_token_id).sum().item()
            assert spans == len(row["aux_images"])
            with torch.no_grad():
                out = model(**batch, labels=batch["input_ids"])
            assert out.latent_loss is not None and math.isfinite(out.latent_loss.item()), format
            assert math.isfinite(out.loss.item())


def test_converted_dataset_passes_the_collator(tmp_path, tiny_gap):
    data = pytest.importorskip("trainers.data", reason="trainers/data.py is not there yet")
    collator_class = getattr(data, "GapDataCollator", None)
    if collator_class is None:
        pytest.skip("trainers/data.py has no GapDataCollator yet")
    from datasets import load_from_disk

    model, processor = tiny_gap
    collator = collator_class(processor)
    for format in ("monet", "mirage", "lvr"):
        output, _, _ = convert_cli(tmp_path / format, format)
        dataset = load_from_disk(str(output))
        batch = collator([dataset[i] for i in range(len(dataset))])
        assert batch["input_ids"].shape[0] == len(dataset)
        markers = sum(assistant_text(row).count(LATENT_MARKER) for row in dataset)
        assert (batch["input_ids"] == model.config.latent_start_token_id).sum().item() == markers
        with torch.no_grad():
            out = model(**batch)
        assert out.latent_loss is not None and math.isfinite(out.latent_loss.item())
