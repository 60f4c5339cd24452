"""Bad configuration and bad inputs raise errors that name the field or the row."""

import pathlib
import re

import pytest
import torch

from testing_utils import COLORS, chat, solid_image
from modeling_gap import GapQwen2_5VLConfig

BAD_FIELDS = [
    ("num_latent_tokens", 0), ("num_latent_tokens", 2.5), ("num_latent_tokens", "8"),
    ("latent_feedback", "linear"), ("latent_pca_rank", 0), ("latent_pca_rank", -3),
    ("latent_pca_trainable", "yes"), ("latent_loss_weight", -1.0), ("latent_loss_weight", "1"),
    ("latent_loss", "l1"), ("latent_ema_momentum", 1.0), ("latent_ema_momentum", -0.1),
    ("latent_target_pooling", "max"), ("latent_pad_token_id", -1), ("latent_start_token_id", "a"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_invalid_config_field_names_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(field)):
        GapQwen2_5VLConfig(**{field: value})


def test_duplicate_latent_token_ids_are_rejected():
    with pytest.raises(ValueError, match="latent_start_token_id"):
        GapQwen2_5VLConfig(latent_pad_token_id=5, latent_start_token_id=5)


def test_valid_config_round_trips(tmp_path):
    config = GapQwen2_5VLConfig(num_latent_tokens=3, latent_feedback="raw", latent_loss_weight=0)
    config.save_pretrained(tmp_path)
    loaded = GapQwen2_5VLConfig.from_pretrained(tmp_path)
    assert (loaded.num_latent_tokens, loaded.latent_feedback, loaded.latent_loss_weight) == (3, "raw", 0)


def _batch(processor, answers, aux):
    processor.tokenizer.padding_side = "right"
    return processor(
        images=[solid_image(COLORS[i]) for i in range(len(answers))],
        text=[chat(processor, "Q?", a) for a in answers], aux_images=aux, padding=True, return_tensors="pt",
    )


def test_more_markers_than_aux_images_names_the_row(tiny_gap):
    _, processor = tiny_gap
    with pytest.raises(ValueError, match=r"Row 1: 2 <\|latent\|> marker\(s\) but 1 aux image"):
        _batch(processor, ["a <|latent|> b", "c <|latent|> d <|latent|>"], [[solid_image(COLORS[2])], [solid_image(COLORS[3])]])


def test_latent_slots_without_targets_name_the_row(tiny_gap):
    model, processor = tiny_gap
    processor.tokenizer.padding_side = "right"
    batch = processor(
        images=[solid_image(COLORS[0]), solid_image(COLORS[1])],
        text=[chat(processor, "Q?", "plain"), chat(processor, "Q?", "x <|latent|> y")], padding=True,
        return_tensors="pt",
    )
    with pytest.raises(ValueError, match="Row 1 has 1 latent span"):
        model(**batch)


def test_span_whose_k_differs_from_the_targets(tiny_gap):
    model, processor = tiny_gap
    k = model.config.num_latent_tokens
    batch = dict(_batch(processor, ["x <|latent|> y"], None))
    with pytest.raises(ValueError, match=f"K={k}"):
        model(**batch, latent_targets=torch.zeros(1, k + 1, model.config.text_config.hidden_size))
    # A span written with the wrong number of slots names its row.
    pad, start, end = model.config.latent_token_ids
    ids = batch["input_ids"].clone()
    position = int((ids[0] == pad).nonzero()[0])
    short = torch.cat([ids[:, :position], ids[:, position + 1 :]], dim=1)
    with pytest.raises(ValueError, match=f"Row 0: the latent span opened at position {position - 1} has {k - 1}"):
        model.latent_slot_mask(short)


def test_targets_count_must_match_spans(tiny_gap):
    model, processor = tiny_gap
    batch = dict(_batch(processor, ["x <|latent|> y <|latent|>"], None))
    with pytest.raises(ValueError, match="2 latent span"):
        model(**batch, latent_targets=torch.zeros(1, model.config.num_latent_tokens, model.config.text_config.hidden_size))


def test_no_unsafe_torch_load_anywhere():
    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        if ".venv" in path.parts or "site-packages" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(root)}:{number}")
    assert not offenders, offenders
