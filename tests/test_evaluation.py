"""Evaluation, probing, norm diagnosis and the latent lens on the tiny model; answer extraction; the metric module."""

import importlib.util
import json
import math
import os

import datasets
import pytest
import torch

from conftest import COLORS, ROOT, solid_image
from trainers.evaluation import (
    METRIC_PATH,
    EvalArguments,
    EvalRow,
    extract_answer,
    load_eval_rows,
    reference_answer,
    standardize_row,
)


def load_recipe(name):
    """A recipe script as a module (named apart from libraries such as `evaluate`)."""
    spec = importlib.util.spec_from_file_location(f"gap_recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text,choices,expected", [
    ("The answer is (B).", ["cat", "dog"], "B"),
    ("B. because the sign is red", ["x", "y", "z"], "B"),
    ("C", None, "C"),
    ("answer: a", ["p", "q"], "A"),
    ("I would pick the dog.", ["cat", "dog"], "B"),
    ("Option E is right", ["a", "b"], ""),  # E is not an option
    ("no idea", ["cat", "dog"], ""),
])
def test_extract_choice(text, choices, expected):
    assert extract_answer(text, "choice", choices) == expected


@pytest.mark.parametrize("text,expected", [
    ("There are 12 apples.", "12"),
    ("First 3, then 4, so the answer is 7", "7"),
    ("Answer: 1,234.50", "1234.5"),
    ("answer: -0.25 m", "-0.25"),
    ("12.0", "12"),
    ("none", ""),
])
def test_extract_number(text, expected):
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize("text,expected", [
    ("The Red Car!", "red car"),
    ("I zoomed in. Answer: an  EXIT sign.", "exit sign"),
    ("", ""),
])
def test_extract_text(text, expected):
    assert extract_answer(text, "text") == expected


def test_metric_module_loads_offline(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(METRIC_PATH)
    result = metric.compute(predictions=["A", "B", "", "12"], references=["A", "C", "D", "12"])
    assert result["accuracy"] == 0.5 and result["correct"] == 2 and result["total"] == 4
    # The Wilson interval of 2/4 at 95 %.
    assert math.isclose(result["ci_low"], 0.15003, abs_tol=1e-4)
    assert math.isclose(result["ci_high"], 0.84997, abs_tol=1e-4)


def test_benchmark_shaped_rows_map_to_eval_rows():
    image = solid_image(COLORS[0])
    mathvista = standardize_row(dict(decoded_image=image, query="Which is larger?", answer="dog", choices=["cat", "dog"],
                                     question_type="multi_choice", answer_type="text"), "mathvista")
    assert (mathvista.kind, mathvista.answer, reference_answer(mathvista)) == ("choice", "B", "B")
    free = standardize_row(dict(decoded_image=image, query="How many?", answer="14", choices=None,
                                question_type="free_form", answer_type="integer"), "mathvista")
    assert free.kind == "number" and reference_answer(free) == "14"
    vstar = standardize_row(dict(image=image, text="Color? (A) red (B) blue", label="A"), "vstar")
    assert vstar.kind == "choice" and vstar.choices is None and reference_answer(vstar) == "A"
    hr = standardize_row(dict(image=image, question="Where?", A="left", B="right", C="up", D="down", answer="C"),
                         "hrbench")
    assert hr.choices == ["left", "right", "up", "down"]
    mme = standardize_row({"image": image, "question": "Which?", "multi-choice options": ["(A) one", "(B) two"],
                           "answer": "B"}, "mme_realworld")
    assert mme.choices == ["one", "two"] and extract_answer("(B) two", "choice", mme.choices) == "B"
    with pytest.raises(KeyError, match="row 3: column 'label' is missing"):
        standardize_row(dict(image=image, text="Q"), "vstar", index=3)
    with pytest.raises(ValueError, match="row 0: the answer"):
        standardize_row(dict(images=[image], question="Q", answer=" "), "gap", index=0)


@pytest.fixture(scope="module")
def tiny_checkpoint_and_split(tmp_path_factory):
    from modeling_gap.tiny import build_tiny_gap

    root = tmp_path_factory.mktemp("eval")
    model, processor = build_tiny_gap(seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    features = datasets.Features({"images": datasets.List(datasets.Image()), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "choices": datasets.List(datasets.Value("string"))})
    rows = dict(images=[[solid_image(c)] for c in COLORS[:4]],
                question=["Colour?", "Which corner?", "How many squares?", "Colour?"],
                answer=["A", "B", "2", "C"], choices=[["red", "green", "blue"], ["left", "right"], [], ["a", "b", "c"]])
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "split"))
    return str(root / "model"), str(root / "split"), root


def test_evaluate_recipe_writes_predictions_and_results(tiny_checkpoint_and_split):
    model_dir, split_dir, root = tiny_checkpoint_and_split
    evaluate_recipe = load_recipe("evaluate")
    args = EvalArguments(model_name_or_path=model_dir, dataset_name=split_dir, max_new_tokens=6, batch_size=3,
                         output_dir=str(root / "out"))
    summary = evaluate_recipe.main(args)
    records = [json.loads(line) for line in open(root / "out" / "predictions.jsonl")]
    assert len(records) == 4 and summary["total"] == 4
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 4
    assert records[2]["kind"] == "number" and records[0]["kind"] == "choice"
    assert json.load(open(root / "out" / "results.json"))["arguments"]["max_new_tokens"] == 6


def test_probe_runs_every_intervention(tiny_checkpoint_and_split):
    model_dir, split_dir, root = tiny_checkpoint_and_split
    probe = load_recipe("probe")
    args = EvalArguments(model_name_or_path=model_dir, dataset_name=split_dir, max_new_tokens=8, batch_size=4,
                         output_dir=str(root / "probe"))
    table = probe.main(args)
    assert [e["intervention"] for e in table] == ["none", "zero", "noise", "shuffle", "mean", "drop"]
    assert all(math.isfinite(e["accuracy"]) and math.isfinite(e["delta_vs_none"]) for e in table)
    assert table[-1]["mean_latent_spans"] == 0  # drop never opens a span
    markdown = open(root / "probe" / "probe.md").read()
    assert "| drop |" in markdown and json.load(open(root / "probe" / "probe.json"))[0]["delta_vs_none"] == 0


def test_diagnosis_ratios_equal_direct_computation(tiny_checkpoint_and_split):
    from trainers.evaluation import build_prompt, load_model_and_processor

    model_dir, split_dir, root = tiny_checkpoint_and_split
    diagnose_norms = load_recipe("diagnose_norms")
    args = EvalArguments(model_name_or_path=model_dir, dataset_name=split_dir, batch_size=2,
                         output_dir=str(root / "norms"))
    result = diagnose_norms.main(args)
    assert os.path.getsize(root / "norms" / "norms.png") > 1000
    assert json.load(open(root / "norms" / "norms.json"))["layers"] == result["layers"]
    # The same ratios straight from the hidden states of one batch holding every row.
    model, processor = load_model_and_processor(model_dir)
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
    from trainers.evaluation import load_model_and_processor

    model_dir, split_dir, root = tiny_checkpoint_and_split
    lens = load_recipe("latent_lens")
    model, processor = load_model_and_processor(model_dir)
    row = EvalRow(images=[solid_image(COLORS[1], size=84)], question="Where?", answer="A", choices=None, kind="text")
    maps, text = lens.latent_similarity_maps(model, processor, row, max_new_tokens=12, max_latent_spans=1,
                                             sequence_bias={(model.config.latent_start_token_id,): 100.0})
    assert maps.shape == (1, model.config.num_latent_tokens, 3, 3)  # 84 px -> 6x6 patches -> 3x3 merged tokens
    assert torch.isfinite(maps).all() and maps.abs().max() <= 1.0 + 1e-5
    lens.draw(row.images[0], maps, str(root / "lens.png"))
    assert os.path.getsize(root / "lens.png") > 1000
    args = EvalArguments(model_name_or_path=model_dir, dataset_name=split_dir, limit=2, max_new_tokens=8,
                         output_dir=str(root / "lens"))
    report = lens.main(args)
    assert len(report) == 2 and os.path.exists(root / "lens" / "lens_1.png")
