"""`trainers.evaluation`: answer extraction, column mappings, the shipped metric module, `gap eval` on the tiny model."""

import json
import math

import pytest

from testing_utils import COLORS, solid_image
from trainers.arguments import EvalArguments
from trainers.evaluation import METRIC_PATH, extract_answer, reference_answer, run_evaluation, standardize_row


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


def test_gap_eval_writes_predictions_and_strict_json_results(tiny_checkpoint_and_split):
    model_dir, split_dir, root = tiny_checkpoint_and_split
    args = EvalArguments(model_name_or_path=model_dir, dataset_name=split_dir, max_new_tokens=6, batch_size=3,
                         output_dir=str(root / "out"))
    summary = run_evaluation(args)
    records = [json.loads(line) for line in open(root / "out" / "predictions.jsonl")]
    assert len(records) == 4 and summary["total"] == 4
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 4
    assert records[2]["kind"] == "number" and records[0]["kind"] == "choice"
    results = json.load(open(root / "out" / "results.json"), parse_constant=lambda c: 1 / 0)  # no NaN / Infinity
    assert results["arguments"]["max_new_tokens"] == 6


def test_gap_rows_evaluate_with_the_question_from_the_user_turn():
    """Converted or synthetic rows (no `question` column) map with the default mapping."""
    from trainers.dataset_loader import load_split

    split = load_split("synthetic", "test").remove_columns("question")  # as `gap convert` writes it
    row = standardize_row(split[0], "gap", index=0)
    user = [m for m in split[0]["messages"] if m["role"] == "user"][0]
    assert row.question == "".join(p["text"] or "" for p in user["content"] if p["type"] == "text").strip()
    assert row.question and row.answer == split[0]["answer"]
    with pytest.raises(KeyError, match="row 5: no 'question' column and no 'messages'"):
        standardize_row(dict(images=[solid_image(COLORS[0])], answer="A"), "gap", index=5)


