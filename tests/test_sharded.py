"""Sharded training on CPU processes (gloo): DeepSpeed ZeRO-3 / ZeRO-2 through `gap sft` under `accelerate launch`,
and GAP's forward/backward under torch's FSDP2 `fully_shard`.

Each launch trains 2 processes; the loss curve of every sharded run equals the same global batch under DDP. The tiny
recipe is the shipped one (PCA fit on the training images, capacity-guided spans) with half of the rows keeping
their span and 2 rows per process, so that some steps have spans on one rank only (the runs record it).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from testing_utils import GAP, ROOT

deepspeed = pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]' (make test installs it)")

pytestmark = pytest.mark.slow

TINY_SFT = os.path.join(ROOT, "recipes", "tiny", "sft", "config_pca.yaml")
CONFIGS = os.path.join(ROOT, "recipes", "accelerate_configs")
COMMON = [
    "--config", TINY_SFT, "--max_steps", "4", "--logging_steps", "1", "--synthetic_rows", "16",
    "--synthetic_use_latent_fraction", "0.5", "--fit_pca_rows", "8", "--per_device_train_batch_size", "2",
    "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--save_strategy", "no", "--disable_tqdm", "true",
]

# `gap sft` with a callback that writes, per rank: the logged metrics, how many latent rows the head mapped at each
# forward (0 when the rank's batch had no span), and the trained model's logits and head outputs on a fixed input.
RANK_SCRIPT = """
import json, os, sys
import torch
from transformers import TrainerCallback

from trainers.cli import parse_stage
from trainers.sft import train


class RankRecord(TrainerCallback):
    def __init__(self):
        self.logs, self.head_rows = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        head = next(m for name, m in model.named_modules() if name.endswith("latent_head"))
        head.register_forward_hook(lambda module, inputs, output: self.head_rows.append(int(inputs[0].shape[0])))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ.get("RANK", 0))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        was_training = base.training
        base.eval()
        with torch.no_grad():  # every rank runs it: under ZeRO-3 the forward gathers the weights
            out = base(input_ids=torch.arange(40, 72)[None], use_cache=False)
            latents = base.latent_head(out.last_hidden_state[0], base.config.latent_feedback)
        base.train(was_training)
        record = dict(rank=rank, world=int(os.environ.get("WORLD_SIZE", 1)), logs=self.logs, head_rows=self.head_rows,
                      logits=out.logits[0, -4:].tolist(), latents=latents[-4:].tolist(), global_step=state.global_step)
        with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)


train(*parse_stage("sft", None), callbacks=[RankRecord()])
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
# Everything is written: skip the interpreter's teardown, where a finished 2-process CPU run has now and then died
# with "terminate called without an active exception" (a C++ thread of the communication stack, under load).
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "sft_ranks.py"
    path.write_text(RANK_SCRIPT)
    return str(path)


def launch(rank_script, config: str, output_dir, *extra) -> list[dict]:
    """`accelerate launch --config_file <config> --num_processes 2` of `gap sft` (via the rank script); the two
    ranks' records."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config),
        "--num_processes", "2", "--main_process_port", str(_free_port()), rank_script, *COMMON,
        "--output_dir", str(output_dir), *extra,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [json.load(open(os.path.join(output_dir, f"rank{r}.json"))) for r in (0, 1)]


def curve(records, key="loss") -> list[float]:
    return [log[key] for log in records[0]["logs"] if key in log and "train_runtime" not in log]


def assert_same_curve(sharded, ddp, tolerance=1e-4):
    for key in ("loss", "ce_loss", "latent_loss"):
        got, expected = curve(sharded, key), curve(ddp, key)
        assert len(got) == len(expected) > 0 and all(map(lambda v: v == v and abs(v) < 1e6, got)), (key, got)
        assert all(abs(a - b) <= tolerance * max(1.0, abs(b)) for a, b in zip(got, expected)), (key, got, expected)


def spans_on_one_rank_only(records) -> int:
    """Steps where one rank's batch had latent spans and the other's had none."""
    rows = [r["head_rows"] for r in records]
    return sum((a == 0) != (b == 0) for a, b in zip(*rows))


@pytest.fixture(scope="module")
def ddp_run(rank_script, tmp_path_factory):
    return launch(rank_script, "ddp.yaml", tmp_path_factory.mktemp("ddp") / "run")


def test_zero3_trains_like_ddp_saves_loads_and_resumes(rank_script, ddp_run, tmp_path):
    output = tmp_path / "zero3"
    zero3 = launch(rank_script, "zero3.yaml", output, "--save_strategy", "steps", "--save_steps", "2",
                   "--save_total_limit", "3")
    assert [r["world"] for r in zero3] == [2, 2]
    assert spans_on_one_rank_only(zero3) > 0, [r["head_rows"] for r in zero3]
    assert_same_curve(zero3, ddp_run)

    # The run saved whole weights (zero3_save_16bit_model): `from_pretrained` gives the trained model's outputs.
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(output), trust_remote_code=True).eval()
    assert type(model).__name__ == "GapQwen2_5VLForConditionalGeneration"
    with torch.no_grad():
        out = model(input_ids=torch.arange(40, 72)[None], use_cache=False)
        latents = model.latent_head(out.last_hidden_state[0], model.config.latent_feedback)
    torch.testing.assert_close(out.logits[0, -4:], torch.tensor(zero3[0]["logits"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(latents[-4:], torch.tensor(zero3[0]["latents"]), atol=1e-5, rtol=1e-5)

    # Resuming from the ZeRO-3 checkpoint of step 2 continues the same curve.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(output / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = launch(rank_script, "zero3.yaml", resumed_dir)
    assert resumed[0]["global_step"] == 4
    got, expected = curve(resumed), curve(zero3)
    assert len(got) == 2 and all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(got, expected[2:])), (got, expected)


def test_zero2_trains_like_ddp(rank_script, ddp_run, tmp_path):
    zero2 = launch(rank_script, "zero2.yaml", tmp_path / "zero2")
    assert spans_on_one_rank_only(zero2) > 0
    assert_same_curve(zero2, ddp_run)


def test_deepspeed_json_through_the_trainer_argument(rank_script, ddp_run, tmp_path):
    """`--deepspeed ds_zero3.json` (the Trainer's own argument) under a plain multi-process launch."""
    zero3 = launch(rank_script, "ddp.yaml", tmp_path / "json", "--deepspeed", os.path.join(CONFIGS, "ds_zero3.json"),
                   "--max_steps", "2")
    assert_same_curve(zero3, [dict(ddp_run[0], logs=ddp_run[0]["logs"][:2])])


def test_stock_checkpoint_converted_under_zero3_init(rank_script, tmp_path):
    """A stock Qwen2.5-VL is loaded partitioned (zero.Init) straight into the GAP class, its head fitted on
    partitioned weights, and trains as under DDP; with closed-loop feedback (`latent_feedback_training="self"`), whose
    extra passes every rank runs as many times."""
    stock = tmp_path / "stock"
    subprocess.run([GAP, "make-tiny", "--stock", "--output_dir", str(stock)], check=True, capture_output=True)
    extra = ["--model_name_or_path", str(stock), "--max_steps", "3", "--latent_feedback_training", "self"]
    zero3 = launch(rank_script, "zero3.yaml", tmp_path / "zero3", *extra)
    ddp = launch(rank_script, "ddp.yaml", tmp_path / "ddp", *extra)
    assert_same_curve(zero3, ddp)


def test_lora_under_zero3_trains_the_head_in_full(rank_script, tmp_path):
    """LoRA on a saved GAP checkpoint (loaded partitioned by `from_pretrained` under zero.Init)."""
    checkpoint = tmp_path / "gap"
    subprocess.run([GAP, "make-tiny", "--output_dir", str(checkpoint)], check=True, capture_output=True)
    records = launch(rank_script, "zero3.yaml", tmp_path / "lora", "--model_name_or_path", str(checkpoint),
                     "--use_peft", "true", "--max_steps", "3", "--learning_rate", "1e-2")
    losses = curve(records, "latent_loss")
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    adapter = tmp_path / "lora" / "adapter_config.json"
    assert adapter.exists() and "latent_head" in json.load(open(adapter))["modules_to_save"]


# ---- FSDP2 ----------------------------------------------------------------------------------------------------------
FSDP_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from trainers.collator import GapDataCollator
from trainers.synthetic import make_synthetic_rows
from trainers.tiny import build_tiny_gap

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model, processor = build_tiny_gap(seed=0, latent_feedback="pca")
model.train()
reference = build_tiny_gap(seed=0, latent_feedback="pca")[0].train()
rows = make_synthetic_rows(2, seed=0)
rows[0]["use_latent"], rows[1]["use_latent"] = True, False  # rank 0's row keeps its span, rank 1's has none
collator = GapDataCollator(processor, capacity_guided=True, capacity_threshold=0.5)
batches = [collator([row]) for row in rows]
assert (batches[0]["input_ids"] == model.config.latent_pad_token_id).any()
assert not (batches[1]["input_ids"] == model.config.latent_pad_token_id).any()

def loss_of(m, batch):
    out = m(**batch, use_cache=False)
    # Without a span the head still ran (on no rows): its zero term keeps its gradient in the step on every rank.
    return out.loss if out.latent_loss is not None else out.loss + out.latent_predictions.sum() * 0

# Unsharded: the mean of the two ranks' losses, as the sharded step averages the gradients.
unsharded = [loss_of(reference, b) for b in batches]
(sum(unsharded) / 2).backward()

for layer in model.model.language_model.layers:
    fully_shard(layer)
for block in model.model.visual.blocks:
    fully_shard(block)
fully_shard(model)
loss = loss_of(model, batches[rank])
loss.backward()  # FSDP averages the gradients over the ranks
losses = [torch.zeros(()) for _ in range(2)]
dist.all_gather(losses, loss.detach())
grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
if rank == 0:
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    worst = max((grads[n] - expected[n]).abs().max().item() for n in expected)
    json.dump(dict(losses=[float(l) for l in losses], unsharded=[float(l) for l in unsharded],
                   grad_names=sorted(grads) == sorted(expected), worst=worst,
                   head_grads=[n for n in grads if "latent_head" in n]), open(os.environ["OUT"], "w"))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)  # see RANK_SCRIPT
"""


def test_fsdp2_forward_and_backward_equal_unsharded(tmp_path):
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "fsdp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(out))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.load(open(out))
    assert result["losses"] == pytest.approx(result["unsharded"], abs=1e-5)
    assert result["grad_names"] and result["head_grads"], result
    assert result["worst"] < 1e-5, result
