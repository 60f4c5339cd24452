"""Shared fixtures: the tiny GAP checkpoint and GAP `generate`'s reference tokens, built once per session with the
package installed beside vLLM in this same environment (`make_fixtures.py`, in a fresh process; `GAP_MAIN_PYTHON`
names another python), and one in-process vLLM engine per test module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One process for engine and worker: faster to start on 2 cores, and the tests can read the worker's span state.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MAIN_PYTHON = os.environ.get("GAP_MAIN_PYTHON", sys.executable)
KV_CACHE_BYTES = 1 << 20  # about 1,000 tokens of the tiny model: a large batch must be preempted


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    if not Path(MAIN_PYTHON).exists():
        pytest.fail(f"{MAIN_PYTHON} not found: GAP_MAIN_PYTHON must name a python with the package installed.")
    out = tmp_path_factory.mktemp("gap_vllm")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([MAIN_PYTHON, str(HERE / "make_fixtures.py"), str(out)], check=True, env=env, cwd=str(REPO))
    with open(out / "references.json") as f:
        refs = json.load(f)
    refs["dir"] = str(out)
    refs["checkpoint"] = str(out / "checkpoint")
    refs["image"] = str(out / "image.png")
    refs["stock_text"] = str(out / "stock-text")  # a model that is not a GAP checkpoint
    return refs


ENGINE_MODES = {
    # vLLM's eager mode.
    "eager": dict(enforce_eager=True),
    # vLLM's default on CPU: the backbone compiled (torch.compile); and chunked prefill with a small token budget,
    # so prompts (and recomputed requests) arrive in chunks.
    "compiled-chunked": dict(enforce_eager=False, max_num_batched_tokens=48),
}


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def llm(fixtures, request):
    """One engine per mode: a KV cache of about 1,000 tokens, prefix caching off (GAP needs it off)."""
    import gc

    from vllm import LLM

    engine = LLM(
        model=fixtures["checkpoint"], dtype="float32", max_model_len=512, max_num_seqs=32, seed=0,
        kv_cache_memory_bytes=KV_CACHE_BYTES, block_size=32, enable_prefix_caching=False,
        limit_mm_per_prompt={"image": 1}, **ENGINE_MODES[request.param],
    )
    yield engine
    del engine
    gc.collect()


def run(llm, prompts, n, **extra):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, extra_args=extra or None)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], outputs


def serving_state(llm):
    """The in-process engine's GAP serving state (`gap_vllm.spans.GapServing`)."""
    from gap_vllm.spans import serving_for

    serving = serving_for(llm.llm_engine.vllm_config)
    assert serving is not None, "the engine's worker runs in another process (VLLM_ENABLE_V1_MULTIPROCESSING)"
    return serving
