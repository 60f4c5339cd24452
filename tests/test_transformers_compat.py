"""A checkpoint saved by this package loads where its users are: every transformers from 5.19 to the newest, in an
environment holding only torch, pillow and that transformers, through the Auto classes with `trust_remote_code=True`,
and gives what the package gives under the newest transformers; below 5.19 the user reads one line naming the range
and the `pip install` command.

Each release runs `compat_scenario.py` (a forward with labels and a latent span; greedy generate with an image, a
span forced open, dynamic and static cache, `return_latents`) in its own process, under eager and sdpa attention.
Under eager attention every tensor is bit-identical to the reference. Under sdpa the forward and the generated tokens
are bit-identical; generate's logits and latents are bit-identical from 5.23 on (when the reference runs 5.23 or
newer, as `make test`'s does), and within 1e-5 before it, because transformers 5.23 changed sdpa's one-query decode
kernel (`pack_gqa` in `integrations/sdpa_attention.py`; stock
Qwen2.5-VL's own generate logits move by the same ~1e-7 between 5.19 and 5.25).

The environments (`transformers_envs.py`) are kept in `.transformers-envs/` (gitignored): a rerun installs nothing.
"""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers

from compat_scenario import run_scenario
from transformers_envs import run_in_env, transformers_env

NEWEST = "5.25.0"  # the newest release on the registry when this was written: the reference's own
SUPPORTED = ("5.19.0", "5.20.0", NEWEST)
SDPA_DECODE_CHANGED = (5, 23)  # transformers 5.23's sdpa decode kernel (pack_gqa): generate's logits move by ~1e-7
BELOW_RANGE = "5.0.0"
MESSAGE = (
    'This GAP checkpoint needs transformers>=5.19,<5.40; this environment has transformers {version}. Upgrade it: '
    'pip install "transformers>=5.19,<5.40"'
)
SCENARIO = (Path(__file__).parent / "compat_scenario.py").read_text()
FORWARD_KEYS = ("train_input_ids", "logits", "loss", "ce_loss", "latent_loss", "latent_predictions")

USER_LOADS_MODEL = """
import sys
from transformers import AutoModelForImageTextToText
AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
"""
USER_LOADS_PROCESSOR = """
import sys
from transformers import AutoProcessor
AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
"""


def _release(version: str) -> tuple[int, int]:
    return tuple(int(p) for p in version.split(".")[:2])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The checkpoint, the package's own results on it (the reference, newest transformers), and every release's
    processes: the scenario under each supported release, the two user scripts under the release below the range.
    Two processes at a time (one thread each)."""
    from modeling_gap import GapQwen2_5VLForConditionalGeneration, GapQwen2_5VLProcessor
    from trainers.tiny import build_tiny_gap

    root = tmp_path_factory.mktemp("compat")
    model, processor = build_tiny_gap(seed=0)
    model.save_pretrained(root / "checkpoint")
    processor.save_pretrained(root / "checkpoint")

    def run(name, version, script, *args):
        cwd = root / name
        cwd.mkdir()
        return run_in_env(transformers_env(version), script, *args, cwd=cwd)

    jobs = {f"scenario-{v}": (v, SCENARIO, root / "checkpoint", root / f"{v}.pt") for v in SUPPORTED}
    jobs["user-model"] = (BELOW_RANGE, USER_LOADS_MODEL, root / "checkpoint")
    jobs["user-processor"] = (BELOW_RANGE, USER_LOADS_PROCESSOR, root / "checkpoint")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, name, *job) for name, job in jobs.items()}
        reference = {}
        for attention in ("eager", "sdpa"):
            model = GapQwen2_5VLForConditionalGeneration.from_pretrained(
                root / "checkpoint", attn_implementation=attention
            ).eval()
            reference[attention] = run_scenario(model, GapQwen2_5VLProcessor.from_pretrained(root / "checkpoint"))
        processes = {name: future.result() for name, future in futures.items()}
    return root, reference, processes


def _results(runs, version):
    root, _, processes = runs
    process = processes[f"scenario-{version}"]
    assert process.returncode == 0, process.stderr[-3000:]
    return torch.load(root / f"{version}.pt", weights_only=True)


@pytest.mark.parametrize("version", SUPPORTED)
def test_the_checkpoint_runs_alone_under_each_supported_release(runs, version):
    environment = _results(runs, version)["environment"]
    assert environment["transformers"] == version
    # Loaded from the checkpoint's own copied code, in an environment without this repository or its libraries.
    assert environment["model_module"].startswith("transformers_modules."), environment
    assert environment["processor_module"].startswith("transformers_modules."), environment
    assert environment["importable"] == [], environment


@pytest.mark.parametrize("version", SUPPORTED)
def test_eager_attention_is_bit_identical_to_the_newest(runs, version):
    results, reference = _results(runs, version)["eager"], runs[1]["eager"]
    assert reference["latent_loss"] > 0 and reference["dynamic_latents"].abs().sum() > 0  # a span was trained and fed
    assert set(results) == set(reference)
    for key, expected in reference.items():
        assert torch.equal(results[key], expected), f"{key} differs under transformers {version}"


@pytest.mark.parametrize("version", SUPPORTED)
def test_sdpa_attention_matches_the_newest(runs, version):
    results, reference = _results(runs, version)["sdpa"], runs[1]["sdpa"]
    for key in (*FORWARD_KEYS, "dynamic_sequences", "static_sequences"):
        assert torch.equal(results[key], reference[key]), f"{key} differs under transformers {version}"
    # The same sdpa decode kernel as the reference's transformers (the newest, unless this suite runs elsewhere).
    exact = (_release(version) >= SDPA_DECODE_CHANGED) == (_release(transformers.__version__) >= SDPA_DECODE_CHANGED)
    for key in ("dynamic_logits", "static_logits", "dynamic_latents", "static_latents"):
        if exact:
            assert torch.equal(results[key], reference[key]), f"{key} differs under transformers {version}"
        else:
            torch.testing.assert_close(results[key], reference[key], atol=1e-5, rtol=0, msg=f"{key} ({version})")


@pytest.mark.parametrize("script", ["user-model", "user-processor"])
def test_below_the_range_the_user_reads_one_line_naming_the_range_and_the_command(runs, script):
    process = runs[2][script]
    assert process.returncode != 0
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert lines[-1] == "ImportError: " + MESSAGE.format(version=BELOW_RANGE), process.stderr[-2000:]
    errors = [line for line in lines if re.match(r"\w*(Error|Exception)\b", line)]
    assert errors == [lines[-1]], errors  # no other error before it
