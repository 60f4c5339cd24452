"""`trainers.dataset_conversion` (`gap convert`): Monet, Mirage and LVR rows become GAP rows that load, pass the processor and the model.

Each format has a hand-written fixture with good rows and at least one bad row of every kind that format can skip.
Hostile input (issue 14) follows: paths leading out of the image root (`..`, absolute, symlinks; an audit hook shows
no file outside the root is opened), per-row failures of any exception type, file-level problems (encoding, BOM,
JSON vs JSONL, nothing converted), `--max-rows`, `--overwrite` over the input, and the image pixel limit.
"""

import io
import json
import math
import os
import struct
import sys
import zlib

import pytest
import torch
from PIL import Image

from trainers.cli import main, run_stage
from trainers.dataset_conversion import (
    LATENT_MARKER,
    MAX_IMAGE_PIXELS,
    REPORT_NAME,
    SKIP_REASONS,
    ConversionError,
    convert_lvr,
    convert_mirage,
    convert_monet,
    extract_answer,
    iter_convert,
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
    from datasets import load_from_disk

    from trainers.collator import GapDataCollator

    model, processor = tiny_gap
    collator = GapDataCollator(processor)
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


# ---------------------------------------------------------------------------------------------------------------------
# Hostile input: the image root
# ---------------------------------------------------------------------------------------------------------------------

_AUDIT = {"installed": False, "on": False, "paths": []}


def _record_open(event, args):
    """An audit hook (it cannot be removed): records the path of every "open" event while `_AUDIT["on"]` is set."""
    if event == "open" and _AUDIT["on"]:
        try:
            if args and isinstance(args[0], (str, bytes)):
                _AUDIT["paths"].append(os.path.realpath(os.fsdecode(args[0])))
        except Exception:  # an audit hook must never raise
            pass


@pytest.fixture
def opened_files():
    """The real paths of every file opened (builtins.open, os.open, io.open_code...) while the test runs."""
    if not _AUDIT["installed"]:
        sys.addaudithook(_record_open)
        _AUDIT["installed"] = True
    _AUDIT["paths"] = []
    _AUDIT["on"] = True
    try:
        yield _AUDIT["paths"]
    finally:
        _AUDIT["on"] = False


def row_with_image(format, reference, aux=False):
    """A row of `format` that converts when `reference` (a question image; with `aux`, the helper image) reads."""
    question, helper = ("q0.png", reference) if aux else (reference, "h0.png")
    if format == "monet":
        return monet_row(question, [{"type": "text", "text": "Look.<abs_vis_token></abs_vis_token>"},
                                    {"type": "image", "image": helper}, {"type": "text", "text": "\\boxed{A}"}])
    if format == "mirage":
        return {"text_input": "<image> Q?", "image_input": [question], "text_output": "<output_image> A",
                "image_output": helper}
    assert not aux  # LVR's aux images are crops of the question image
    return lvr_row((question,))


def outside_setup(tmp_path):
    """images/ (the root, with a symlink to a file and one to a folder outside it) and outside/secret.png, a valid
    image that would convert if it were read: (root, outside folder, the references that lead outside)."""
    root = write_images(tmp_path / "images")
    outside = tmp_path / "outside"
    outside.mkdir()
    gradient(30, 30, 9).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "sub").mkdir()
    (root / "inner.png").symlink_to(root / "q1.png")  # a symlink that stays inside: fine
    escapes = ["../outside/secret.png", "sub/../../outside/secret.png", str(outside / "secret.png"),
               "file://" + str(outside / "secret.png"), "link.png", "linkdir/secret.png", "/etc/passwd"]
    return root, outside, escapes


@pytest.mark.parametrize("format", ["monet", "mirage", "lvr"])
def test_image_paths_outside_the_root_are_skipped_and_never_opened(tmp_path, format, opened_files):
    root, outside, escapes = outside_setup(tmp_path)
    inside = ["q0.png", str(root / "q1.png"), "sub/../q0.png", "inner.png", "./q0.png"]
    rows = [row_with_image(format, ref) for ref in inside + escapes]
    if format != "lvr":
        rows += [row_with_image(format, ref, aux=True) for ref in escapes]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    opened_files.clear()  # record from here on
    report = run_stage("convert", ["--format", format, "--input", str(path), "--image-root", str(root),
                                   "--output", str(tmp_path / "out")])
    assert report["rows_converted"] == len(inside)
    assert report["skipped"]["outside_image_root"]["rows"] == list(range(len(inside), len(rows)))
    assert set(report["skipped"]) == {"outside_image_root"}
    # The audit: no file outside the root was opened (the hook saw the input, the outputs and the images).
    assert str(root / "q0.png") in opened_files
    assert not [p for p in opened_files if p.startswith(str(outside)) or p == "/etc/passwd"]

    # The Python API opens nothing but images inside the root (Python's own files aside: lazy imports).
    opened_files.clear()
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.realpath(sys.prefix)})
    records, skipped = CONVERTERS[format](rows, str(root))
    assert len(records) == len(inside) and {s["reason"] for s in skipped} == {"outside_image_root"}
    foreign = [p for p in opened_files if not p.startswith(str(root) + os.sep) and not p.startswith(prefixes)]
    assert foreign == []
    assert "--allow-outside-root" in skipped[0]["detail"]


def test_allow_outside_root_reads_them(tmp_path, opened_files):
    root, outside, escapes = outside_setup(tmp_path)
    rows = [row_with_image("mirage", ref) for ref in escapes[:-1]]  # not /etc/passwd: not an image
    opened_files.clear()
    records, skipped = convert_mirage(rows, str(root), allow_outside_root=True)
    assert skipped == [] and len(records) == len(rows)
    secret = (outside / "secret.png").read_bytes()
    assert all(record["images"][0]["bytes"] == secret for record in records)
    assert str(outside / "secret.png") in opened_files  # the audit does see files outside, when they are opened
    # The CLI flag.
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = run_stage("convert", ["--format", "mirage", "--input", str(path), "--image-root", str(root),
                                   "--output", str(tmp_path / "out"), "--allow-outside-root"])
    assert report["rows_converted"] == len(rows)


def test_outside_root_under_strict_names_the_row(tmp_path):
    root, _, escapes = outside_setup(tmp_path)
    rows = [lvr_row(), lvr_row(("link.png",))]
    with pytest.raises(ConversionError, match=r"^Row 1: outside_image_root: ") as error:
        convert_lvr(rows, str(root), strict=True)
    assert error.value.index == 1 and error.value.reason == "outside_image_root"


def test_special_files_are_skipped_not_read(tmp_path):
    root = write_images(tmp_path / "images")
    os.mkfifo(root / "fifo.png")  # opening it would block forever
    (root / "folder.png").mkdir()
    rows = [lvr_row(("fifo.png",)), lvr_row(("folder.png",)), lvr_row()]
    records, skipped = convert_lvr(rows, str(root))
    assert [s["reason"] for s in skipped] == ["missing_image", "missing_image"] and len(records) == 1
    assert "not a regular file" in skipped[0]["detail"]
    if os.path.exists("/proc/self/mem"):  # a regular file by stat, but reading it fails (EIO)
        rows = [lvr_row(("/proc/self/mem",)), lvr_row(("q0.png",))]
        records, skipped = convert_lvr(rows, str(root), allow_outside_root=True)
        assert [(s["row"], s["reason"]) for s in skipped] == [(0, "unreadable_image")] and len(records) == 1
        assert "OSError" in skipped[0]["detail"]
        with pytest.raises(ConversionError, match=r"^Row 0: unreadable_image: "):
            convert_lvr(rows, str(root), allow_outside_root=True, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# Hostile input: per-row failures of any type
# ---------------------------------------------------------------------------------------------------------------------


def test_huge_box_numbers_are_bad_boxes(tmp_path):
    root = write_images(tmp_path / "images")
    rows = [lvr_row(boxes=((0.1, 0.1, 10**400, 0.5),)),  # OverflowError as a float
            lvr_row(boxes=((0.1, 0.1, 10**5000, 0.5),)),  # too long even for repr()
            lvr_row(boxes=((0.1, 0.1, float("inf"), 0.5),)), lvr_row(boxes=((float("nan"), 0.1, 0.5, 0.5),)),
            lvr_row(boxes=((True, 0.1, 0.5, 0.5),)), lvr_row()]
    records, skipped = convert_lvr(rows, str(root))
    assert [s["reason"] for s in skipped] == ["bad_box"] * 5 and len(records) == 1
    assert all(len(s["detail"]) < 400 for s in skipped)
    with pytest.raises(ConversionError, match=r"^Row 0: bad_box: "):
        convert_lvr(rows, str(root), strict=True)
    # The same numbers written in JSON: a 401-digit integer, and one of 5,000 digits (past Python's int limit).
    path = tmp_path / "train.json"
    big, huge = "1" + "0" * 400, "1" * 5000
    text = json.dumps([lvr_row(boxes=((0.1, 0.1, 0.7, 0.5),))] * 3 + [lvr_row()])
    text = text.replace("0.7", big, 1).replace("0.7", huge, 1)
    path.write_text(text)
    output = tmp_path / "out"
    report = run_stage("convert", ["--format", "lvr", "--input", str(path), "--image-root", str(root),
                                   "--output", str(output)])
    assert report["skipped"]["bad_box"]["rows"] == [0, 1] and report["rows_converted"] == 2
    # A long integer where the converter does not look (Monet metadata) does not stop the row.
    path = tmp_path / "monet.json"
    text = json.dumps([monet_row(metadata={"sample_id": 0})])
    path.write_text(text.replace('"sample_id": 0', f'"sample_id": {huge}'))
    report = run_stage("convert", ["--format", "monet", "--input", str(path), "--image-root", str(root),
                                   "--output", str(tmp_path / "monet-out")])
    assert report["rows_converted"] == 1


def test_lone_surrogate_is_a_skip_not_a_failed_write(tmp_path):
    from datasets import load_from_disk

    root = write_images(tmp_path / "images")
    good = mirage_fixture()[0][0]
    bad = dict(good, text_output="A \ud800 lone surrogate <output_image>")
    bad_answer = dict(good, answer="\udfff")
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [good, bad, good, bad_answer]) + "\n")  # JSON escapes it
    assert "\\ud800" in path.read_text()
    output = tmp_path / "out"
    report = run_stage("convert", ["--format", "mirage", "--input", str(path), "--image-root", str(root),
                                   "--output", str(output)])
    assert report["skipped"]["unencodable_text"]["rows"] == [1, 3] and report["rows_converted"] == 2
    assert load_from_disk(str(output))["source_index"] == [0, 2]
    with pytest.raises(ConversionError, match=r"^Row 1: unencodable_text: "):
        run_stage("convert", ["--format", "mirage", "--input", str(path), "--image-root", str(root),
                              "--output", str(tmp_path / "strict"), "--strict"])
    assert not (tmp_path / "strict").exists()


def test_any_exception_in_a_row_is_a_named_skip(tmp_path, monkeypatch):
    import trainers.dataset_conversion as conversion

    root = write_images(tmp_path / "images")
    real = conversion._lvr_row
    errors = {1: ZeroDivisionError("boom"), 2: RecursionError("deep"), 3: MemoryError(), 4: KeyError("k")}

    def flaky(row, reader):
        if row.get("id") in errors:
            raise errors[row["id"]]
        return real(row, reader)

    monkeypatch.setattr(conversion, "_lvr_row", flaky)
    rows = [dict(lvr_row(), id=i) for i in range(6)]
    rows.append({"image": ["q0.png"], "conversations": [{"from": ["gpt"], "value": "x"}], "bboxes": []})  # unhashable
    records, skipped = convert_lvr(rows, str(root))
    assert [r["source_index"] for r in records] == [0, 5]
    assert [(s["row"], s["reason"]) for s in skipped] == [(1, "conversion_error"), (2, "conversion_error"),
                                                         (3, "conversion_error"), (4, "conversion_error"),
                                                         (6, "malformed_row")]
    assert skipped[0]["detail"] == "ZeroDivisionError: boom" and skipped[2]["detail"].startswith("MemoryError")
    with pytest.raises(ConversionError, match=r"^Row 1: conversion_error: ZeroDivisionError: boom") as error:
        convert_lvr(rows, str(root), strict=True)
    assert isinstance(error.value.__cause__, ZeroDivisionError)
    # Through the CLI: counted in the report, and the description of every reason is there to print.
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    report = run_stage("convert", ["--format", "lvr", "--input", str(path), "--image-root", str(root),
                                   "--output", str(tmp_path / "out")])
    assert report["skipped"]["conversion_error"]["rows"] == [1, 2, 3, 4]
    assert {"conversion_error", "unencodable_text", "outside_image_root", "image_too_large"} <= set(SKIP_REASONS)


# ---------------------------------------------------------------------------------------------------------------------
# Hostile input: the file
# ---------------------------------------------------------------------------------------------------------------------


def gap_convert(capsys, *args):
    """`gap convert ARGS` through the CLI's `main`: (exit code, its one error line, or "")."""
    try:
        main(["convert", *map(str, args)])
        code = 0
    except SystemExit as exit:
        code = exit.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gap convert: error: ")]
    assert len(lines) <= 1, lines
    return code, lines[0] if lines else ""


def test_bom_is_stripped_and_json_lists_are_told_from_jsonl(tmp_path):
    root = write_images(tmp_path / "images")
    fixture = lvr_fixture()
    expected = sum(reason is None for _, reason in fixture)
    cases = {
        "list_bom.json": "\ufeff" + json.dumps([row for row, _ in fixture], indent=1),
        "list_bom_spaces.json": "\ufeff \n" + json.dumps([row for row, _ in fixture]),
        "lines_bom.jsonl": "\ufeff" + "".join(json.dumps(row) + "\n" for row, _ in fixture),
        "one_line.jsonl": json.dumps(fixture[0][0]) + "\n",  # one row on one line: JSONL
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        report = run_stage("convert", ["--format", "lvr", "--input", str(path), "--image-root", str(root),
                                       "--output", str(tmp_path / f"out-{name}")])
        assert report["rows_converted"] == (1 if name == "one_line.jsonl" else expected), name
        assert report["rows_in"] == (1 if name == "one_line.jsonl" else len(fixture)), name
    assert load_rows(str(tmp_path / "list_bom.json")) == [row for row, _ in fixture]


def test_file_level_problems_are_one_clear_error(tmp_path, capsys):
    root = write_images(tmp_path / "images")
    rows = [row for row, _ in lvr_fixture()]
    cases = {
        "latin1.json": (json.dumps(rows[:1]).replace("sign", "sign caf\u00e9").encode("latin-1"), "is not UTF-8"),
        "utf16.json": (json.dumps(rows[:1]).encode("utf-16"), "UTF-16"),
        "object.json": (json.dumps({"rows": rows[:2]}, indent=2).encode(), "one JSON object over"),
        "bom_object.json": (b"\xef\xbb\xbf" + json.dumps({"data": rows[:2]}, indent=1).encode(), "one JSON object"),
        "empty.json": (b"", "holds no rows"),
        "blank.jsonl": (b"\n \n", "holds no rows"),
        "empty_list.json": (b"\xef\xbb\xbf[]", "holds no rows"),
        "broken_list.json": (b"[{\"image\": 1},", "starts like a JSON list but does not parse"),
        "deep_list.json": (b"[" * 100_000, "does not parse"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        output = tmp_path / f"out-{name}"
        code, err = gap_convert(capsys, "--format", "lvr", "--input", path, "--image-root", root, "--output", output)
        assert code == 1, name
        assert err.startswith("gap convert: error: ") and "\n" not in err, (name, err)
        assert message in err and str(path) in err, (name, err)
        assert not output.exists(), name
        with pytest.raises(ValueError, match=message):
            load_rows(str(path))
    # Missing input file, image root that is not a folder.
    code, err = gap_convert(capsys, "--format", "lvr", "--input", tmp_path / "nope.json", "--output", tmp_path / "o")
    assert code == 1 and "is not a file" in err
    good = tmp_path / "good.json"
    good.write_text(json.dumps(rows[:1]))
    code, err = gap_convert(capsys, "--format", "lvr", "--input", good, "--image-root", root / "q0.png",
                            "--output", tmp_path / "o")
    assert code == 1 and "--image-root" in err and "not a folder" in err


def test_jsonl_lines_that_do_not_parse_are_row_skips(tmp_path):
    root = write_images(tmp_path / "images")
    good = json.dumps(mirage_fixture()[0][0])
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([good, "[" * 100_000, "{\"a\": " + "1" * 5000 + "}", "{broken", good]) + "\n")
    rows = load_rows(str(path))
    assert len(rows) == 5
    records, skipped = convert_mirage(rows, str(root))
    assert [(s["row"], s["reason"]) for s in skipped] == [(1, "malformed_json"), (2, "malformed_row"),
                                                         (3, "malformed_json")]
    assert "RecursionError" in skipped[0]["detail"] and len(records) == 2


def test_nothing_converted_is_an_error(tmp_path, capsys):
    root = write_images(tmp_path / "images")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([lvr_row(("missing.png",)), lvr_row(("../escape.png",)), {"no": "fields"}]))
    output = tmp_path / "out"
    code, err = gap_convert(capsys, "--format", "lvr", "--input", path, "--image-root", root, "--output", output)
    assert code == 1 and err.startswith("gap convert: error: no row of ") and "\n" not in err
    assert "all 3 skipped" in err and "missing_image 1" in err and "outside_image_root 1" in err
    assert "--allow-outside-root" in err and "row 0: missing_image" in err
    assert not output.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".convert-")]  # the scratch folder is gone


@pytest.mark.parametrize("value", ["-1", "0", "-5"])
def test_max_rows_must_be_at_least_one(tmp_path, capsys, value):
    path, root, fixture = write_input(tmp_path, "lvr")
    output = tmp_path / "out"
    code, err = gap_convert(capsys, "--format", "lvr", "--input", path, "--image-root", root, "--output", output,
                            "--max-rows", value)
    assert code == 1 and "--max-rows must be a whole number >= 1" in err and value in err
    assert not output.exists()
    with pytest.raises(ValueError, match="--max-rows"):
        load_rows(str(path), int(value))
    # N >= 1 keeps exactly the first N.
    report = run_stage("convert", ["--format", "lvr", "--input", str(path), "--image-root", str(root),
                                   "--output", str(output), "--max-rows", "2"])
    assert report["rows_in"] == 2 and report["rows_converted"] == 2
    assert len(load_rows(str(path), len(fixture) - 1)) == len(fixture) - 1


def test_overwrite_refuses_to_delete_the_input_or_the_images(tmp_path, capsys):
    path, root, _ = write_input(tmp_path, "lvr")  # tmp_path/train.json, tmp_path/images
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for output, what in [(tmp_path, "the input file"), (root, "the image root"), (tmp_path / "link", "the input"),
                         (tmp_path.parent, "holds the input file")]:
        for extra in ([], ["--overwrite"]):
            code, err = gap_convert(capsys, "--format", "lvr", "--input", path, "--image-root", root,
                                    "--output", output, *extra)
            assert code == 1 and what in err and "choose an output folder" in err, (output, err)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing deleted, nothing written
    # The input's folder as the image root with the output elsewhere is fine, and --overwrite replaces it.
    output = tmp_path.parent / f"{tmp_path.name}-out"
    for _ in range(2):
        report = run_stage("convert", ["--format", "lvr", "--input", str(path), "--image-root", str(root),
                                       "--output", str(output), "--overwrite"])
        assert report["rows_converted"] == 2
    # With --allow-outside-root an output folder holding images the rows read is not replaced either.
    inner = output / "pics"
    inner.mkdir()
    gradient(20, 20).save(inner / "a.png")
    rows_path = tmp_path / "abs.json"
    rows_path.write_text(json.dumps([lvr_row((str(inner / "a.png"),), gpt="<answer>A</answer>", boxes=())]))
    code, err = gap_convert(capsys, "--format", "lvr", "--input", rows_path, "--image-root", root, "--output", output,
                            "--overwrite", "--allow-outside-root")
    assert code == 1 and "would delete them" in err and (inner / "a.png").exists()


def png_header_only(width, height):
    """A PNG whose header claims width x height pixels, with one tiny compressed row: a decompression bomb's shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_image_pixel_limit(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    root = write_images(tmp_path / "images")
    (root / "bomb.png").write_bytes(png_header_only(9_000, 9_000))  # 81 Mpx claimed, a few bytes
    (root / "huge.png").write_bytes(png_header_only(100_000, 100_000))  # 10 Gpx: past Pillow's own limit too
    rows = [lvr_row(("bomb.png",), gpt="<answer>A</answer>", boxes=()), lvr_row(("q0.png",)),
            lvr_row(("q1.png",)), lvr_row(("huge.png",), gpt="<answer>A</answer>", boxes=())]
    records, skipped = convert_lvr(rows, str(root))
    assert [(s["row"], s["reason"]) for s in skipped] == [(0, "image_too_large"), (3, "image_too_large")]
    assert len(records) == 2
    assert str(MAX_IMAGE_PIXELS) in skipped[0]["detail"] and "9000x9000" in skipped[0]["detail"]
    assert "decompression bomb" in skipped[1]["detail"]
    rows = rows[:3]
    # A lower limit: q0 (80 x 60 = 4,800 px) passes, q1 (64 x 64 = 4,096) too at 4,800, not at 4,000.
    records, skipped = convert_lvr(rows, str(root), max_image_pixels=4_000)
    assert [s["reason"] for s in skipped] == ["image_too_large"] * 3
    records, skipped = convert_lvr(rows, str(root), max_image_pixels=4_800)
    assert [s["row"] for s in skipped] == [0]
    # No limit of ours: Pillow's DecompressionBombError is caught and named the same.
    records, skipped = convert_lvr(rows, str(root), max_image_pixels=None)  # bomb.png is then decoded: truncated
    assert [(s["row"], s["reason"]) for s in skipped] == [(0, "unreadable_image")] and len(records) == 2
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1_000)  # Pillow refuses > 2,000 px
    records, skipped = convert_lvr(rows[1:], str(root), max_image_pixels=None)
    assert [s["reason"] for s in skipped] == ["image_too_large"] * 2
    with pytest.raises(ConversionError, match=r"^Row 0: image_too_large: "):
        convert_lvr(rows, str(root), strict=True)
    with pytest.raises(ValueError, match="--max-image-pixels"):
        convert_lvr(rows, str(root), max_image_pixels=0)


def test_pixel_limit_flag(tmp_path, capsys):
    path, root, fixture = write_input(tmp_path, "lvr")
    report = run_stage("convert", ["--format", "lvr", "--input", str(path), "--image-root", str(root),
                                   "--output", str(tmp_path / "out"), "--max-image-pixels", "4500"])
    assert report["skipped"]["image_too_large"]["rows"][0] == 0  # q0: 80 x 60 = 4,800 px; q1 (64 x 64) converts
    assert report["rows_converted"] == 1
    code, err = gap_convert(capsys, "--format", "lvr", "--input", path, "--image-root", root,
                            "--output", tmp_path / "out2", "--max-image-pixels", "0")
    assert code == 1 and "--max-image-pixels must be a whole number >= 1" in err
