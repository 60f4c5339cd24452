"""The `gap` command (`trainers.cli`), and the package installed from a wheel: `gap make-tiny`, `gap sft` and
`gap eval` (with the shipped metric) run offline from an empty directory, with no checkout on `sys.path`."""

import glob
import json
import os
import subprocess
import sys

import pytest

from testing_utils import ROOT, run_gap
from trainers.cli import STAGES, SUMMARIES


def test_gap_lists_every_stage_and_each_stage_has_help():
    listed = run_gap("--help")
    assert listed.returncode == 0
    for stage in STAGES:
        assert f"  {stage} " in listed.stdout and SUMMARIES[stage] in listed.stdout
    helped = run_gap("eval", "--help")
    assert helped.returncode == 0 and "--model_name_or_path" in helped.stdout and "--column_mapping" in helped.stdout


def test_an_unknown_stage_or_a_bad_input_is_one_clear_line(tmp_path):
    unknown = run_gap("trian")
    assert unknown.returncode != 0 and "unknown stage 'trian'" in unknown.stderr
    missing = run_gap("eval", "--model_name_or_path", tmp_path / "nothing-here", "--dataset_name", "synthetic")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_a_gpu_recipe_on_a_machine_without_gpus_fails_in_one_line():
    recipe = os.path.join(ROOT, "recipes", "qwen2_5_vl_7b", "sft", "config_pca_lora.yaml")
    done = run_gap("sft", "--config", recipe)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert errors[-1].startswith("gap sft: error: this recipe trains in bf16 on GPUs")
    assert sum(line.startswith("gap sft: error") for line in errors) == 1


def test_gap_make_data_writes_both_splits_in_the_schema(tmp_path):
    import datasets

    done = run_gap("make-data", "--output_dir", tmp_path / "data", "--train_rows", "4", "--test_rows", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    splits = datasets.load_from_disk(str(tmp_path / "data"))
    assert {name: len(split) for name, split in splits.items()} == {"train": 4, "test": 2}
    assert {"images", "messages", "aux_images", "answer"} <= set(splits["train"].column_names)


TINY_SFT_YAML = """\
model_name_or_path: tiny
dataset_name: synthetic
synthetic_rows: 8
fit_pca_rows: 4
max_steps: 2
per_device_train_batch_size: 4
logging_steps: 1
save_strategy: "no"
use_cpu: true
report_to: none
disable_tqdm: true
output_dir: sft-out
"""


@pytest.mark.slow
def test_the_wheel_installs_and_runs_make_tiny_sft_and_eval_offline(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(dist), ROOT], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = glob.glob(str(dist / "gap_vlm-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], capture_output=True,
                               text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    # The dependencies (torch, transformers, trl, ...) come from this test's environment through a path file; the
    # package itself only from the wheel (a path file's own folder is not scanned for the checkout's editable hooks).
    site, = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(os.path.join(p, "torch")))
    with open(os.path.join(site, "zz_test_dependencies.pth"), "w") as f:
        f.write(deps + "\n")

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")

    def gap(*args):
        done = subprocess.run([venv / "bin" / "gap", *map(str, args)], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"gap {args[0]}: " + done.stdout[-2000:] + done.stderr[-3000:]
        return done

    where = subprocess.run([python, "-c", "import trainers, modeling_gap; print(trainers.__file__, modeling_gap.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and ROOT not in where.stdout and str(venv) in where.stdout, where.stdout + where.stderr
    gap("make-tiny", "--output_dir", "tiny-gap")
    assert (work / "tiny-gap" / "model.safetensors").exists()
    (work / "sft.yaml").write_text(TINY_SFT_YAML)
    gap("sft", "--config", "sft.yaml")
    assert (work / "sft-out" / "train_results.json").exists()
    gap("eval", "--model_name_or_path", "sft-out", "--dataset_name", "synthetic", "--limit", "4",
        "--max_new_tokens", "8", "--output_dir", "eval-out")
    results = json.load(open(work / "eval-out" / "results.json"), parse_constant=lambda c: 1 / 0)
    assert results["total"] == 4 and 0 <= results["accuracy"] <= 1 and results["ci_low"] <= results["ci_high"]
    # The metric came from the wheel's package data.
    metric = subprocess.run([python, "-c", "import trainers.evaluation as e; print(e.METRIC_PATH)"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=120)
    assert metric.stdout.strip().startswith(str(venv)) and os.path.isfile(
        os.path.join(metric.stdout.strip(), "gap_accuracy.py"))
