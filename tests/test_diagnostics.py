"""`trainers.diagnostics`: probing, the norm diagnosis and the latent lens on the tiny model."""

import json
import math
import os

import torch

from testing_utils import COLORS, solid_image
from trainers.arguments import EvalArguments
from trainers.diagnostics import (
    draw_lens,
    latent_similarity_maps,
    run_latent_lens,
    run_norm_diagnosis,
    run_probe,
)
from trainers.evaluation import EvalRow, build_prompt, load_eval_model, load_eval_rows


def test_probe_runs_every_intervention(tiny_checkpoint_and_split):
    model_dir, split_dir, root = tiny_checkpoint_and_split
    args = EvalArguments(model_name_or_path=model_dir, dataset_name=split_dir, max_new_tokens=8, batch_size=4,
                         output_dir=str(root / "probe"))
    table = run_probe(args)
    assert [e["intervention"] for e in table] == ["none", "zero", "noise", "shuffle", "mean", "drop"]
    assert all(math.isfinite(e["accuracy"]) and math.isfinite(e["delta_vs_none"]) for e in table)
    assert table[-1]["mean_latent_spans"] == 0  # drop never opens a span
    markdown = open(root / "probe" / "probe.md").read()
    assert "| drop |" in markdown and json.load(open(root / "probe" / "probe.json"))[0]["delta_vs_none"] == 0


def test_diagnosis_ratios_equal_direct_computation(tiny_checkpoint_and_split):
    model_dir, split_dir, root = tiny_checkpoint_and_split
    args = EvalArguments(model_name_or_path=model_dir, dataset_name=split_dir, batch_size=2,
                         output_dir=str(root / "norms"))
    result = run_norm_diagnosis(args)
    assert os.path.getsize(root / "norms" / "norms.png") > 1000
    assert json.load(open(root / "norms" / "norms.json"))["layers"] == result["layers"]
    # The same ratios straight from the hidden states of one batch holding every row.
    model, processor = load_eval_model(args)
    rows = load_eval_rows(args)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[r.images[0] for r in rows], text=[build_prompt(processor, r) for r in rows],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model.model(**inputs, output_hidden_states=True).hidden_states
    real = inputs["attention_mask"].bool()
    image = (inputs["input_ids"] == model.config.image_token_id) & real
    text = real & ~image
    for layer, state in enumerate(states):
        norms = state.norm(dim=-1)
        assert math.isclose(result["text_norm"][layer], norms[text].mean().item(), rel_tol=1e-4)
        assert math.isclose(result["image_norm"][layer], norms[image].mean().item(), rel_tol=1e-4)
    assert math.isclose(result["final_text_ratio"],
                        (states[-1].norm(dim=-1)[text].mean() / states[0].norm(dim=-1)[text].mean()).item(), rel_tol=1e-4)
    assert set(result["feedback_ratio"]) >= {"raw", "pca"}
    assert all(math.isfinite(v) and v > 0 for v in result["feedback_ratio"].values())


def test_latent_lens_draws_a_heatmap_per_latent(tiny_checkpoint_and_split):
    model_dir, split_dir, root = tiny_checkpoint_and_split
    model, processor = load_eval_model(EvalArguments(model_name_or_path=model_dir))
    row = EvalRow(images=[solid_image(COLORS[1], size=84)], question="Where?", answer="A", choices=None, kind="text")
    maps, text = latent_similarity_maps(model, processor, row, max_new_tokens=12, max_latent_spans=1,
                                        sequence_bias={(model.config.latent_start_token_id,): 100.0})
    assert maps.shape == (1, model.config.num_latent_tokens, 3, 3)  # 84 px -> 6x6 patches -> 3x3 merged tokens
    assert torch.isfinite(maps).all() and maps.abs().max() <= 1.0 + 1e-5
    draw_lens(row.images[0], maps, str(root / "lens.png"))
    assert os.path.getsize(root / "lens.png") > 1000
    args = EvalArguments(model_name_or_path=model_dir, dataset_name=split_dir, limit=2, max_new_tokens=8,
                         output_dir=str(root / "lens"))
    report = run_latent_lens(args)
    assert len(report) == 2 and os.path.exists(root / "lens" / "lens_1.png")
