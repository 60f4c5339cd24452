"""Tensor parallelism: the tiny GAP checkpoint served with `tensor_parallel_size=2` gives GAP generate's tokens.

Every rank computes the same final hidden state, so each rank's latent head feeds the same vector: TP=2 must give
the references that TP=1 gives (`test_engine.py`). One engine (its own process tree: a multiprocessing executor with
one worker process per rank).

On vLLM's CPU backend each rank is one OpenMP thread group. Its automatic binding wants one NUMA node per rank and
refuses a one-node machine ("AssertionError: Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers.
Allowed NUMA nodes are [0]. Please try to bind threads manually or decrease DP/TP/PP."), so the test binds the
allowed CPUs by hand, half to each rank (`VLLM_CPU_OMP_THREADS_BIND="0|1"` on a 2-core machine) unless
`VLLM_CPU_OMP_THREADS_BIND` is already set.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

if __name__ == "__main__":
    checkpoint, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    if not current_platform.is_cpu():
        import torch
        if torch.cuda.device_count() < 2:
            print("SKIP tensor_parallel_size=2 needs 2 GPUs; found", torch.cuda.device_count())
            sys.exit(0)
    llm = LLM(model=checkpoint, dtype="float32", max_model_len=512, max_num_seqs=32, seed=0, block_size=32,
              kv_cache_memory_bytes=1 << 22, enforce_eager=True, enable_prefix_caching=False,
              limit_mm_per_prompt={"image": 1}, tensor_parallel_size=2, distributed_executor_backend="mp")
    result = {}
    for name, extra in (("batch_pca", None), ("zero", {"latent_intervention": "zero"})):
        params = SamplingParams(temperature=0, max_tokens=n, extra_args=extra)
        result[name] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    print("TOKENS", json.dumps(result))
"""


def _cpu_binding() -> str | None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return ",".join(map(str, cpus[:half])) + "|" + ",".join(map(str, cpus[half:]))


def test_tensor_parallel_2_gives_the_references(fixtures):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    if "VLLM_CPU_OMP_THREADS_BIND" not in env:
        binding = _cpu_binding()
        if binding is None:
            pytest.skip("tensor parallelism on the CPU backend needs 2 CPUs (one OpenMP thread group per rank)")
        env["VLLM_CPU_OMP_THREADS_BIND"] = binding
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, fixtures["checkpoint"], json.dumps(fixtures["prompts"]),
         str(fixtures["max_new_tokens"])],
        capture_output=True, text=True, timeout=400, env=env,
    )
    output = result.stdout + result.stderr
    with open(os.path.join(fixtures["dir"], "tensor_parallel.log"), "w") as f:
        f.write(output)
    skip = [line for line in result.stdout.splitlines() if line.startswith("SKIP ")]
    if skip:
        pytest.skip(skip[0][5:])
    assert result.returncode == 0, output[-4000:]
    tokens = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("TOKENS "))[7:])
    assert tokens["batch_pca"] == fixtures["cases"]["batch_pca"]
    assert tokens["zero"] == fixtures["cases"]["zero"]
