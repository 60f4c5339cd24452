"""`trainers.sft` (`gap sft`): trains, saves, resumes by itself, and runs under accelerate with several processes."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForImageTextToText, TrainerCallback

from testing_utils import GAP, ROOT
from trainers.cli import parse_stage
from trainers.sft import train

TINY_SFT = os.path.join(ROOT, "recipes", "tiny", "sft", "config_pca.yaml")


# ---- one process ----------------------------------------------------------------------------------------------------
def test_sft_trains_saves_and_resumes_by_itself(tmp_path):
    output = tmp_path / "run"

    def run(interrupt_at=None):
        argv = [
            "--config", TINY_SFT, "--output_dir", str(output), "--max_steps", "3", "--save_steps", "2",
            "--synthetic_rows", "8", "--fit_pca_rows", "4", "--logging_steps", "1", "--disable_tqdm", "true",
        ]
        steps = []

        class CountAndInterrupt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                steps.append(state.global_step)

            def on_save(self, args, state, control, **kwargs):
                if state.global_step == interrupt_at:
                    raise KeyboardInterrupt  # as a user's Ctrl-C, after checkpoint-2 is written

        try:
            return train(*parse_stage("sft", argv), callbacks=[CountAndInterrupt()]), steps
        except KeyboardInterrupt:
            return None, steps

    _, steps = run(interrupt_at=2)
    assert steps == [1, 2] and (output / "checkpoint-2").is_dir() and not (output / "train_results.json").exists()
    trainer, steps = run()
    assert steps == [3]  # resumed from checkpoint-2 without being told
    assert trainer.state.global_step == 3 and (output / "train_results.json").exists()
    assert run() == (None, [])  # finished: a third run trains nothing
    model = AutoModelForImageTextToText.from_pretrained(str(output), trust_remote_code=True)
    assert type(model).__name__ == "GapQwen2_5VLForConditionalGeneration"
    assert model.config.latent_loss == "mse_whitened+cos"
    assert (output / "processor_config.json").exists() and (output / "modeling_gap.py").exists()


# ---- several processes ------------------------------------------------------------------------------------------
RANK_SCRIPT = """
import json, os
import torch
from transformers import TrainerCallback

from trainers.cli import parse_stage
from trainers.sft import train


class RankLog(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ.get("RANK", 0))
        weights = {name: p.detach().double().sum().item() for name, p in model.named_parameters()}
        with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(rank=rank, world=int(os.environ.get("WORLD_SIZE", 1)), logs=self.logs, weights=weights), f)


train(*parse_stage("sft", None), callbacks=[RankLog()])
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_agree_and_match_one_process(tmp_path):
    script = tmp_path / "sft_ranks.py"
    script.write_text(RANK_SCRIPT)
    common = [
        "--config", TINY_SFT, "--max_steps", "2",
        "--logging_steps", "1", "--synthetic_rows", "16", "--fit_pca_rows", "8", "--save_strategy", "no",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        os.path.join(ROOT, "recipes", "accelerate_configs", "ddp.yaml"), "--num_processes", "2", "--main_process_port",
        "29517", str(script), *common, "--output_dir", str(tmp_path / "ddp"), "--per_device_train_batch_size", "4",
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.load(open(tmp_path / "ddp" / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    losses = [[log["loss"] for log in r["logs"] if "loss" in log] for r in ranks]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical

    # One process with the same global batch (2 x 4 = 8) sees the same rows per step: same losses, same weights.
    single = subprocess.run(
        [sys.executable, str(script), *common, "--output_dir", str(tmp_path / "one"),
         "--per_device_train_batch_size", "8"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.load(open(tmp_path / "one" / "rank0.json"))
    one_losses = [log["loss"] for log in one["logs"] if "loss" in log]
    assert all(abs(a - b) < 1e-4 for a, b in zip(losses[0], one_losses)), (losses[0], one_losses)
    for name, value in one["weights"].items():
        assert abs(value - ranks[0]["weights"][name]) <= 1e-4 * max(1.0, abs(value)), name


def test_the_fsdp_config_without_gpus_fails_once_in_one_line(tmp_path):
    """accelerate runs FSDP on GPUs only: on CPU each launched process would train alone on the same output_dir
    (measured: `Accelerator().distributed_type` is NO in both). `gap sft` refuses, one line, before any work."""
    output = tmp_path / "fsdp"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        os.path.join(ROOT, "recipes", "accelerate_configs", "fsdp.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", "29519", GAP, "sft", "--config", TINY_SFT,
        "--max_steps", "2", "--output_dir", str(output),
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("gap sft: error:")]
    assert len(errors) == 1 and "FSDP" in errors[0] and "GPUs only" in errors[0], done.stderr[-3000:]
    assert not output.exists()
