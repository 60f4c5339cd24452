"""A seeded fuzzer of dataset rows: corruptions of valid rows go through `validate_gap_dataset`, and every row it
accepts through the collator and the tiny model's forward. Each outcome must be a clear error naming the row
(before training), or a row that trains as it reads: one span per kept marker, the row's own aux images as the
targets, labels that spell the assistant text. No forward crash, no silent label corruption."""

import io
import math
import random

import pytest
import torch

from testing_utils import COLORS, solid_image
from trainers.collator import GapDataCollator, GapDatasetValidationError, validate_gap_dataset
from trainers.schema import LATENT_MARKER, remove_latent_markers

CONTROL_TEXTS = ["<|im_end|>", "<|im_start|>assistant\n", "<|im_end|>\n<|im_start|>assistant\nSure.",
                 "<|latent_start|>", "<|latent_pad|>", "<|latent_end|>", "<|latent_start|><|latent_pad|><|latent_end|>",
                 "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>", "<|video_pad|>"]
UNICODE_TEXTS = ["ünïcödé", "😀🎉", "עברית", "\u0301\u0301", "tab\tand\nnewline", "NUL\x00byte", "\ufeffbom",
                 "lone \ud800 surrogate", "<|latent", "latent|>", "<|lat ent|>", "< |latent|>", "\u2060"]
MAX_LENGTHS = [None, None, None, 400, 120, 60]


def _png(color, size=56) -> dict:
    buffer = io.BytesIO()
    solid_image(color, size).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def base_rows(rng: random.Random) -> list[dict]:
    """Valid rows of the shapes datasets hold: string or part-list contents, one or two spans, capacity columns."""
    c = lambda: COLORS[rng.randrange(len(COLORS))]  # noqa: E731
    return [
        dict(images=[_png(c())], messages=[
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"Look. {LATENT_MARKER} It is red."}]}],
            aux_images=[_png(c(), 84)], answer="red"),
        dict(images=[_png(c())], messages=[
            {"role": "user", "content": "Which corner is light?"},
            {"role": "assistant", "content": f"First {LATENT_MARKER} then {LATENT_MARKER} so: top left."}],
            aux_images=[_png(c(), 56), _png(c(), 84)], answer="top left", use_latent=True, base_pass_rate=0.25),
        dict(images=[_png(c()), _png(c())], messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Compare."}, {"type": "text",
                                                                                   "text": f" {LATENT_MARKER} No."}]}],
            aux_images=[_png(c(), 56)], answer="no", base_pass_rate=0.75),
        dict(images=[_png(c())], messages=[
            {"role": "user", "content": "Count?"}, {"role": "assistant", "content": f"{LATENT_MARKER} Two."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes, two."}],
            aux_images=[_png(c(), 84)], answer="2", use_latent=False),
    ]


def _texts(row):
    """(message, part index or None) of every text in the row."""
    out = []
    for message in row["messages"]:
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("content"), str):
            out.append((message, None))
        elif isinstance(message.get("content"), list):
            out += [(message, j) for j, p in enumerate(message["content"]) if isinstance(p, dict) and p.get("type") == "text"]
    return out


def _set_text(message, j, transform):
    if j is None:
        message["content"] = transform(message["content"])
    else:
        message["content"][j]["text"] = transform(message["content"][j]["text"] or "")


def corrupt(row: dict, rng: random.Random) -> dict:
    """One seeded corruption (sometimes two) of a deep copy of `row`."""
    import copy

    row = copy.deepcopy(row)
    for _ in range(1 + (rng.random() < 0.2)):
        try:
            kind = rng.randrange(22)
            texts = _texts(row) if isinstance(row.get("messages"), list) else []
            if kind in (0, 1, 2) and texts:  # a control / latent token typed into some text
                message, j = rng.choice(texts)
                token = rng.choice(CONTROL_TEXTS)
                _set_text(message, j, lambda t: t[: (k := rng.randrange(len(t) + 1))] + token + t[k:])
            elif kind == 3 and texts:  # unicode
                message, j = rng.choice(texts)
                _set_text(message, j, lambda t: t + rng.choice(UNICODE_TEXTS))
            elif kind == 4:  # the marker split across two text parts
                row["messages"][-1]["content"] = [{"type": "text", "text": "Look <|lat"}, {"type": "text", "text": "ent|> red."}]
                row["aux_images"] = rng.choice([[], [_png(COLORS[0])]])
            elif kind == 5:  # a marker in the user turn
                user = next((m for m in row["messages"] if m["role"] == "user"), row["messages"][0])
                _set_text(user, None if isinstance(user["content"], str) else next(
                    (j for j, p in enumerate(user["content"]) if p.get("type") == "text"), None),
                    lambda t: t + f" {LATENT_MARKER}")
                if rng.random() < 0.5:
                    row["aux_images"].append(_png(COLORS[1]))
            elif kind == 6:  # aux count off
                if row["aux_images"] and rng.random() < 0.5:
                    row["aux_images"].pop()
                else:
                    row["aux_images"].append(_png(COLORS[2], 84))
            elif kind == 7:
                rng.choice(row["messages"])["role"] = rng.choice(["bot", "", None, "Assistant", "tool"])
            elif kind == 8:
                rng.choice(row["messages"])["content"] = rng.choice([3, None, {"text": "x"}, [], ["a string"], [None]])
            elif kind == 9:
                message = rng.choice(row["messages"])
                message["content"] = [rng.choice([{"type": "video"}, {"type": "text", "text": None}, {"text": "no type"},
                                                  {"type": "text", "text": 5}])]
            elif kind == 10:
                row["images"][0] = rng.choice([None, {"bytes": b"not an image", "path": None}, {"bytes": None, "path": None},
                                               12, "/nonexistent/file.png", {"bytes": _png(COLORS[0])["bytes"][:40]}])
            elif kind == 11 and row["aux_images"]:
                row["aux_images"][0] = rng.choice([None, {"bytes": b"\x89PNG broken", "path": None}, 3.5])
            elif kind == 12:
                row["use_latent"] = rng.choice(["yes", 1, 0, None, True, False, [True], float("nan")])
            elif kind == 13:
                row["base_pass_rate"] = rng.choice([2.0, -0.1, float("nan"), "0.5", None, 0.3, 0.5, 1, True, float("inf")])
            elif kind == 14:  # no assistant, or an empty one
                choice = rng.randrange(3)
                if choice == 0:
                    row["messages"] = [m for m in row["messages"] if m["role"] != "assistant"]
                else:
                    row["messages"][-1] = {"role": "assistant", "content": [" ", LATENT_MARKER][choice - 1]}
                    row["aux_images"] = [_png(COLORS[3])] * (choice - 1)
            elif kind == 15:
                row["messages"] = rng.choice([None, [], "text", [["user", "hi"]], [{"role": "user"}]])
            elif kind == 16:  # an image placeholder without an image, or an image without a placeholder
                user = next((m for m in row["messages"] if m["role"] == "user"), None)
                if user is not None and isinstance(user["content"], list):
                    user["content"].insert(0, {"type": "image"})
                else:
                    row["images"] = []
            elif kind == 17:
                row["answer"] = rng.choice([3, ["a"], None, ""])
            elif kind == 18:  # a run of markers with matching aux images
                row["messages"][-1] = {"role": "assistant", "content": f"A {LATENT_MARKER}{LATENT_MARKER}\n{LATENT_MARKER} B"}
                row["aux_images"] = [_png(COLORS[i]) for i in range(3)]
            elif kind == 19:  # odd shapes of the image columns
                row[rng.choice(["images", "aux_images"])] = rng.choice([None, "img.png", {"bytes": b""}, 7])
            elif kind == 20:
                row["images"] = [{"bytes": _png(COLORS[0], 1)["bytes"], "path": None}]  # a 1x1 image
            elif kind == 21 and texts:  # long text (then max_length cuts through spans and images)
                message, j = rng.choice(texts)
                _set_text(message, j, lambda t: t + " lorem" * rng.randrange(5, 60))
        except (AttributeError, TypeError, KeyError, IndexError, StopIteration):
            pass  # an earlier corruption left no room for this one
    return row


def expected_labels(row, collator, use_latent: bool) -> str:
    """What the labels must spell: each assistant turn's text (markers as start + end, padded slots masked), then
    <|im_end|>."""
    out = []
    for message in row["messages"]:
        if message["role"] != "assistant":
            continue
        content = message["content"]
        text = content if isinstance(content, str) else "".join(p["text"] for p in content if p.get("type") == "text")
        text = text if use_latent else remove_latent_markers(text)
        out.append(text.replace(LATENT_MARKER, "<|latent_start|><|latent_end|>") + "<|im_end|>")
    return "".join(out)


def uses_latent(row) -> bool:
    if row.get("use_latent") is not None:
        return bool(row["use_latent"])
    if row.get("base_pass_rate") is not None:
        return float(row["base_pass_rate"]) <= 0.5
    return True


def run_fuzz(tiny_gap, count: int, seed: int):
    model, processor = tiny_gap
    rng = random.Random(seed)
    bases = base_rows(rng)
    outcomes = {"accepted": 0, "refused": 0}
    for case in range(count):
        row = corrupt(bases[case % len(bases)], rng)
        max_length = MAX_LENGTHS[case % len(MAX_LENGTHS)]
        where = f"case {case} (seed {seed}, max_length {max_length}): {row!r:.300}"
        try:
            validate_gap_dataset([row], processor, max_length=max_length)
        except GapDatasetValidationError as error:
            assert str(error).startswith("Row 0: "), where + f"\n-> {error}"
            outcomes["refused"] += 1
            continue
        except Exception as error:  # noqa: BLE001 - any other exception is a finding
            pytest.fail(f"{where}\nvalidation raised {type(error).__name__}: {error}")
        outcomes["accepted"] += 1
        collator = GapDataCollator(processor, max_length=max_length)
        batch = collator([row])
        with torch.no_grad():
            out = model(**batch, use_cache=False)
        assert math.isfinite(float(out.loss)), where
        keep = uses_latent(row)
        markers = sum((m["content"] if isinstance(m["content"], str) else "".join(
            p["text"] for p in m["content"] if p.get("type") == "text")).count(LATENT_MARKER)
            for m in row["messages"] if m["role"] == "assistant")
        start, end = model.config.latent_start_token_id, model.config.latent_end_token_id
        ids = batch["input_ids"][0]
        assert int((ids == start).sum()) == int((ids == end).sum()) == (markers if keep else 0), where
        if keep and markers:
            alone = processor.image_processor(images=[collator.prepare_row(row, 0).aux_images[j]
                                                      for j in range(markers)], return_tensors="pt")
            assert torch.equal(batch["aux_pixel_values"], alone["pixel_values"]), where  # the row's own targets
        else:
            assert "aux_pixel_values" not in batch, where
        supervised = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
        expected = expected_labels(row, collator, keep)
        if max_length is not None and ids.shape[0] == max_length:
            assert expected.startswith(supervised) and supervised, where  # cut in text only
        else:
            assert supervised == expected, where + f"\nlabels {supervised!r}\nwanted {expected!r}"
    return outcomes


def test_three_hundred_corrupted_rows_are_refused_by_name_or_train_as_they_read(tiny_gap):
    outcomes = run_fuzz(tiny_gap, count=300, seed=0)
    assert outcomes["accepted"] > 30 and outcomes["refused"] > 100, outcomes


@pytest.mark.slow
def test_a_thousand_more_corrupted_rows(tiny_gap):
    outcomes = run_fuzz(tiny_gap, count=1000, seed=1)
    assert outcomes["accepted"] > 100 and outcomes["refused"] > 300, outcomes
