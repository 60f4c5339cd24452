"""`trainers.diagnostics`: probing, the norm diagnosis and the latent lens on the tiny model."""

import json
import math
import os

import pytest
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
    args = EvalArguments(model_name_or_path=model_dir, dataset_name=split_dir, batch_size=2, max_new_tokens=6,
                         latent_feedback="pca", output_dir=str(root / "norms"))
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
    assert math.isclose(result["visual_input_embedding_norm"], states[0].norm(dim=-1)[image].mean().item(), rel_tol=1e-4)
    # The untrained model opens no span and the split has no spans to teacher-force: nothing fed, and it says so.
    assert result["feedback_ratio"] == {} and result["teacher_forced"] is None
    assert any("never opened a latent span" in note for note in result["notes"])


@pytest.fixture
def span_opening_model(monkeypatch):
    """The tiny GAP model (ema_norm calibrated by a PCA fit) whose `generate` opens one span per row (a bias on
    `<|latent_start|>`, as a trained model would), and a few named-shape rows."""
    from modeling_gap import fit_latent_head_pca
    from trainers.demo import make_splits
    from trainers.tiny import build_tiny_gap

    model, processor = build_tiny_gap(seed=0)
    _, rows = make_splits(8, 3, seed=0)
    fit_latent_head_pca(model, [r["images"][0] for r in rows], image_processor=processor.image_processor)
    original = type(model).generate

    def generate(self, *args, **kwargs):
        kwargs.setdefault("sequence_bias", {(self.config.latent_start_token_id,): 100.0})
        kwargs.setdefault("max_latent_spans", 1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", generate)
    return model.eval(), processor, rows


def test_norms_are_measured_at_the_states_the_head_maps(span_opening_model, tmp_path):
    """Closed loop: at every slot, the head applied to the recorded final state gives exactly what `generate` fed,
    in each feedback mode; teacher-forced: the recorded state before each slot gives the forward's own latent
    predictions. The fed ratio is the fed latents' mean norm over the visual input embeddings' mean norm."""
    from trainers.collator import GapDataCollator
    from trainers.demo import _eval_row
    from trainers.diagnostics import closed_loop_states, diagnose, plot_norms, teacher_forced_states

    model, processor, rows = span_opening_model
    evals = [_eval_row(r) for r in rows]
    k = model.config.num_latent_tokens
    loops = {}
    for mode in ("raw", "ema_norm", "pca"):
        loop = loops[mode] = closed_loop_states(model, processor, evals, mode, batch_size=3, max_new_tokens=7)
        assert loop["rows_with_span"] == len(rows) and loop["fed"].shape == (len(rows) * k, 64)
        assert loop["states"].shape == (model.config.text_config.num_hidden_layers + 1, len(rows) * k, 64)
        mapped = model.latent_head(loop["states"][-1], feedback=mode)
        torch.testing.assert_close(mapped, loop["fed"], atol=1e-5, rtol=1e-5)
    taught = teacher_forced_states(model, processor, rows, batch_size=3)
    batch = GapDataCollator(processor, capacity_guided=False)(rows)
    batch.pop("labels")
    with torch.no_grad():
        predictions = model(**batch).latent_predictions.flatten(0, 1)
    torch.testing.assert_close(model.latent_head(taught["states"][-1], feedback="pca"), predictions)

    result = diagnose(model, processor, evals, batch_size=3, dataset_rows=rows, max_new_tokens=7)
    inputs = processor.image_processor(images=[r["images"][0] for r in rows], return_tensors="pt")
    with torch.no_grad():
        visual = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                           .pooler_output).norm(dim=-1).mean().item()
    assert math.isclose(result["visual_input_embedding_norm"], visual, rel_tol=1e-4)
    fed_pca = loops["pca"]["fed"].norm(dim=-1).mean().item()
    assert math.isclose(result["feedback_ratio"]["pca"], fed_pca / visual, rel_tol=1e-4)
    assert math.isclose(result["feedback_ratio"]["ema_norm"], float(model.latent_head.ema_norm) / visual, rel_tol=1e-4)
    assert result["feedback_ratio"]["raw"] > 10 * result["feedback_ratio"]["pca"]  # the mismatch the head corrects
    assert set(result["teacher_forced"]["feedback"]) == {"raw", "ema_norm", "pca"}
    assert len(result["closed_loop"]["pca"]["fed"]["ratios"]) == len(rows) * k
    plot_norms(result, str(tmp_path / "norms.png"))
    assert os.path.getsize(tmp_path / "norms.png") > 20_000


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
