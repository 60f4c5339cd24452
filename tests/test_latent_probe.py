"""`trainers.latent_probe` (`gap probe-latents`): the held-out linear probe, and the stage end to end on the tiny model.
The probe's power on a trained model against the noise control is checked on the demo's run (`tests/test_demo.py`,
slow)."""

import json

import pytest
import torch

from trainers.latent_probe import held_out_predictions, probe_latents

COLOURS = ["red", "green", "blue", "yellow"]


def test_probe_reads_a_linear_signal_and_not_noise():
    """Latent 0 holds the label (a class mean plus noise), latents 1-3 only noise: the probe reads latent 0 far above
    chance and above shuffled labels; on noise it stays at chance, as it does on shuffled labels."""
    generator = torch.Generator().manual_seed(0)
    n, k, d = 120, 4, 32
    labels = [COLOURS[i % 4] for i in range(n)]
    latents = torch.randn(n, k, d, generator=generator)
    means = 2 * torch.randn(4, d, generator=generator)
    latents[:, 0] += means[torch.arange(n) % 4]
    result = probe_latents(latents, labels, folds=5, seed=0)
    assert result["rows"] == n and result["classes"] == sorted(COLOURS) and result["chance"] == 0.25
    signal, noise = result["latents"]["0"], result["latents"]["2"]
    assert signal["ci_low"] > 0.8 and signal["ci_low"] > result["shuffled"]["0"]["ci_high"]
    assert noise["ci_low"] < 0.25 < noise["ci_high"] and noise["accuracy"] < 0.4
    assert result["latents"]["span"]["ci_low"] > 0.5  # the span holds latent 0
    assert len(signal["correct_rows"]) == n and sum(signal["correct_rows"]) == signal["correct"]


def test_predictions_are_held_out():
    """One feature per row (a row identity) fits the training rows perfectly and predicts nothing about a row it has
    not seen: held-out accuracy is at chance, so no row is predicted by a probe that saw it."""
    n = 60
    labels = torch.arange(n) % 3
    predicted = held_out_predictions(torch.eye(n), labels, num_classes=3, folds=5, seed=1)
    assert (predicted == labels).float().mean() <= 0.5


def test_a_label_with_one_value_is_refused():
    with pytest.raises(ValueError, match="single value"):
        probe_latents(torch.randn(10, 2, 4), ["red"] * 10)


@pytest.fixture
def probe_inputs(tmp_path_factory, monkeypatch):
    """Two tiny GAP checkpoints (seeds 0 and 1), a 9-row named-shape test split saved as the demo saves it, and
    `generate` opening one span per row (a bias on `<|latent_start|>`, as a trained model would)."""
    from modeling_gap import GapQwen2_5VLForConditionalGeneration
    from trainers.demo import make_splits, save_test_split
    from trainers.tiny import build_tiny_gap

    root = tmp_path_factory.mktemp("latent_probe")
    for seed in (0, 1):
        model, processor = build_tiny_gap(seed=seed)
        model.save_pretrained(root / f"model-{seed}")
        processor.save_pretrained(root / f"model-{seed}")
    save_test_split(make_splits(8, 9, seed=0)[1], str(root / "data"))
    original = GapQwen2_5VLForConditionalGeneration.generate

    def generate(self, *args, **kwargs):
        kwargs.setdefault("sequence_bias", {(self.config.latent_start_token_id,): 100.0})
        kwargs.setdefault("max_latent_spans", 1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GapQwen2_5VLForConditionalGeneration, "generate", generate)
    return root


def test_gap_probe_latents_writes_json_table_and_png(probe_inputs, capsys):
    from trainers.cli import main, run_stage

    root = probe_inputs
    report = run_stage("probe-latents", [
        "--model_name_or_path", str(root / "model-0"), "--dataset_name", str(root / "data"),
        "--label_columns", "answer", "shape", "--control_models", str(root / "model-1"), "--probe_folds", "3",
        "--max_new_tokens", "8", "--output_dir", str(root / "out")])
    assert list(report) == ["answer", "shape"]
    assert list(report["answer"]) == ["closed loop", "targets (teacher-forced)", "control model-1"]
    for by_source in report.values():
        for result in by_source.values():
            assert result["rows"] == 9 and result["rows_without_span"] == 0
            assert list(result["latents"]) == ["0", "1", "2", "3", "span"]
            assert all(0 <= e["ci_low"] <= e["accuracy"] <= e["ci_high"] <= 1 for e in result["latents"].values())
    written = json.loads((root / "out" / "latent_probe.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert written["rows"] == 9 and "correct_rows" not in written["probes"]["shape"]["closed loop"]["latents"]["0"]
    table = (root / "out" / "latent_probe.md").read_text()
    assert "| control model-1 |" in table and "| closed loop, shuffled labels |" in table
    assert (root / "out" / "latent_probe.png").stat().st_size > 20_000

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["probe-latents", "--model_name_or_path", str(root / "model-0"), "--dataset_name", str(root / "data"),
              "--label_columns", "colour", "--output_dir", str(root / "bad")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("gap probe-latents: error: label column(s) ['colour'] are not in")
    assert "--label_columns" in error
