"""The demo and its study (`trainers/demo.py`): held-out splits, the written table / JSON / PNG, the zero-latent
control, reproducibility. Tiny budgets: the whole file runs in well under a minute on 2 CPU cores."""

import functools
import json
import os

import pytest
import torch

from trainers.demo import CONTROL, SplitOverlapError, check_disjoint, main, make_splits
from trainers.synthetic import image_hash, make_shape_rows

NOISE_CONTROL = "pca, noise latents (control)"


def test_test_split_shares_no_image_with_training_split():
    train, test = make_splits(256, 64, seed=0)
    train_hashes = {image_hash(image) for row in train for image in row["images"]}
    assert len(train_hashes) == len(train)  # boards are distinct within a split too
    assert not any(image_hash(image) in train_hashes for row in test for image in row["images"])
    assert len({row["answer"] for row in test}) > 1 and len({tuple(row["cell"]) for row in test}) > 1
    # the check fails the run, not a warning, when a test board is pixel-identical to a training board
    copy = dict(test[0], images=[train[5]["images"][0].copy()])
    with pytest.raises(SplitOverlapError, match="1 of 3 test rows"):
        check_disjoint(train, [test[1], copy, test[2]])
    # drawing with the training hashes excluded redraws colliding boards
    again = make_shape_rows(16, seed=0, exclude_hashes={row["image_hash"] for row in train[:8]})
    assert not {row["image_hash"] for row in again} & {row["image_hash"] for row in train[:8]}


def test_intent_states_where_to_look():
    row = make_shape_rows(1, seed=3)[0]
    r, c = row["cell"]
    text = row["messages"][1]["content"][0]["text"]
    assert text.startswith(f"The {row['shape']} is in row {r + 1}, column {c + 1}. <|latent|> Answer: ")
    assert row["question"] == f"What colour is the {row['shape']}?"
    named = make_shape_rows(1, seed=3, intent="name")[0]
    assert named["messages"][1]["content"][0]["text"].startswith(f"Find the {row['shape']}. <|latent|>")


def _tiny_study(output_dir, *options):
    torch.set_num_threads(1)
    return main(["--study", "--output_dir", str(output_dir), "--train_rows", "16", "--test_rows", "6",
                 "--max_new_tokens", "16", "--logging_steps", "2", *options])


def test_study_writes_table_json_and_png_with_intervals(tmp_path):
    """At a tiny budget: the files, strict JSON, a row per variant and budget, intervals around each accuracy and
    each intervention effect (the control's effects at a real budget: the slow test below)."""
    _tiny_study(tmp_path / "a", "--seeds", "0", "1", "--budgets", "2", "4", "--variants", "pca", CONTROL)
    for name in ("results.md", "results.json", "accuracy.png"):
        assert os.path.getsize(tmp_path / "a" / name) > 0
    strict = json.loads((tmp_path / "a" / "results.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert [(e["variant"], e["steps"]) for e in strict["summary"]] == [
        (v, s) for v in ("text SFT", "pca", CONTROL) for s in (2, 4)]
    markdown = (tmp_path / "a" / "results.md").read_text()
    assert "nan" not in markdown.lower() and "| pca, zero latents (control) | 4 |" in markdown
    for entry in strict["summary"]:
        assert entry["closed_loop"]["ci_low"] <= entry["closed_loop"]["accuracy"] <= entry["closed_loop"]["ci_high"]
        for effect in entry.get("interventions", {}).values():  # latent variants only
            assert effect["ci_low"] <= effect["ci_high"]
    assert all("interventions" in e for e in strict["summary"] if e["variant"] != "text SFT")


@pytest.mark.slow
def test_the_metric_tells_used_latents_from_a_control_that_ignores_them(tmp_path):
    """At a budget where pca has learned (400 steps, the make-demo slice's), zeroing or shuffling its latents costs
    accuracy beyond the interval, while the same interventions cost the noise-latent control (trained with noise at
    the latent slots) nothing: its effects lie above pca's, intervals apart, and none is a loss beyond its interval.
    On the same run: a linear probe reads the crop's colour from pca's fed latents better than from the noise
    control's and than from shuffled labels (intervals apart), and `gap diagnose-norms` on the saved pca checkpoint
    gives the study's norm ratio."""
    torch.set_num_threads(1)
    result = main(["--study", "--output_dir", str(tmp_path), "--seeds", "0", "--budgets", "400", "--test_rows", "100",
                   "--variants", "pca", NOISE_CONTROL])
    by_variant = {e["variant"]: e for e in result["summary"]}
    for name in ("zero", "shuffle"):
        used, unused = by_variant["pca"]["interventions"][name], by_variant[NOISE_CONTROL]["interventions"][name]
        assert used["outside_interval"] and used["ci_high"] < 0, (name, used)
        assert unused["ci_high"] >= 0 and unused["ci_low"] > used["ci_high"], (name, unused, used)

    evidence = by_variant["pca"]["latent_probe"]["colour"]["closed loop"]
    control = by_variant[NOISE_CONTROL]["latent_probe"]["colour"]["closed loop"]
    assert evidence["rows"] == control["rows"] == 100
    assert evidence["latents"]["span"]["ci_low"] > control["latents"]["span"]["ci_high"], (evidence, control)
    for name, entry in evidence["latents"].items():  # every latent of the span, and the whole span
        assert entry["ci_low"] > evidence["shuffled"][name]["ci_high"], (name, entry, evidence["shuffled"][name])
    assert "| pca | 400 | closed loop | 100 (0) |" in (tmp_path / "results.md").read_text()

    from trainers.arguments import EvalArguments
    from trainers.diagnostics import run_norm_diagnosis

    norms = run_norm_diagnosis(EvalArguments(
        model_name_or_path=str(tmp_path / "pca-checkpoint"), dataset_name=str(tmp_path / "test-data"),
        latent_feedback="pca", max_new_tokens=56, batch_size=50, output_dir=str(tmp_path / "norms")))
    study_ratio = by_variant["pca"]["norm_ratio"]
    assert abs(norms["feedback_ratio"]["pca"] - study_ratio) < 0.05, (norms["feedback_ratio"], study_ratio)
    assert abs(result["diagnosis"]["feedback_ratio"]["pca"] - study_ratio) < 0.05
    assert norms["teacher_forced"]["rows"] == 100 and (tmp_path / "norms" / "norms.png").stat().st_size > 20_000


def test_demo_slice_runs_without_warnings_from_the_project(tmp_path):
    """The make-demo path (the slice's defaults, tiny budgets) with every FutureWarning, and any warning raised from
    the project's own modules, turned into an error; it writes the norm diagnosis and prints the probe commands."""
    import contextlib
    import io
    import warnings

    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("error", module=r"(trainers|modeling_gap|recipes)(\..*)?$")
        main(["--output_dir", str(tmp_path), "--train_rows", "16", "--test_rows", "6", "--budgets", "2",
              "--max_new_tokens", "16", "--logging_steps", "2", "--variants", "pca"])
    for name in ("results.md", "norms.json", "norms.png", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "gap probe-latents --model_name_or_path" in out.getvalue()
    assert "Norm diagnosis (pca" in (tmp_path / "results.md").read_text()


def test_same_seed_and_flags_reproduce_the_same_numbers(tmp_path):
    options = ("--seeds", "1", "--budgets", "3", "--variants", NOISE_CONTROL, "--no_save")
    first, second = _tiny_study(tmp_path / "a", *options), _tiny_study(tmp_path / "b", *options)
    assert first["summary"] == second["summary"]
    assert (tmp_path / "a" / "results.md").read_text().split("\n")[2:] == \
        (tmp_path / "b" / "results.md").read_text().split("\n")[2:]


def test_control_trains_with_zero_latents(monkeypatch):
    """The zero control's trainer feeds zeros at every latent slot, the noise control noise, pca the targets."""
    from trainers import demo

    fed = []
    from modeling_gap import GapQwen2_5VLForConditionalGeneration

    original = GapQwen2_5VLForConditionalGeneration.forward

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        if self.training and kwargs.get("latent_inputs") is not None:
            fed.append(kwargs["latent_inputs"].abs().max().item())
        elif self.training:
            fed.append(None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GapQwen2_5VLForConditionalGeneration, "forward", spy)
    torch.set_num_threads(1)
    args = demo.parse_args(["--train_rows", "8", "--test_rows", "2", "--max_new_tokens", "4"])
    train, test = make_splits(8, 2, seed=0)
    expected = {CONTROL: lambda v: v == 0.0, NOISE_CONTROL: lambda v: v is not None and v > 0,
                "pca": lambda v: v is None}
    for name, check in expected.items():
        fed.clear()
        demo.train_variant(name, train, [r["images"][0] for r in train], test, args, 0, [2], str(_tmp()),
                           lambda message: None)
        assert fed and all(check(value) for value in fed), (name, fed)


def _tmp():
    import tempfile

    return tempfile.mkdtemp(prefix="gap-demo-test-")
