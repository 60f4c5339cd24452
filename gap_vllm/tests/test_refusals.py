"""Configurations that cannot feed latents correctly are refused with what to do (a separate process each)."""

import subprocess
import sys

SCRIPT = """
import sys
from vllm import LLM
try:
    LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, enable_prefix_caching=True,
        kv_cache_memory_bytes=1 << 20, block_size=32)
except Exception as error:
    chain, e = [], error
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    print("REFUSED", " | ".join(chain))
    sys.exit(3)
"""


def test_prefix_caching_is_refused(fixtures):
    result = subprocess.run([sys.executable, "-c", SCRIPT, fixtures["checkpoint"]], capture_output=True, text=True,
                            timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "--no-enable-prefix-caching" in output
