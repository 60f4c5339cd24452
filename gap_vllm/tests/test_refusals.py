"""Configurations and requests that cannot feed latents correctly are refused with what to do (a separate process
each): prefix caching at start; prompts holding latent slots and structured output per request, before the engine."""

import json
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


OFFLINE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.sampling_params import StructuredOutputsParams

if __name__ == "__main__":
    checkpoint, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLM(model=checkpoint, dtype="float32", max_model_len=256, enforce_eager=True, enable_prefix_caching=False,
              kv_cache_memory_bytes=1 << 20, block_size=32, limit_mm_per_prompt={"image": 1})
    params = SamplingParams(temperature=0, max_tokens=n)
    spans = prompt + "<|latent_start|><|latent_pad|><|latent_pad|><|latent_end|>"
    tries = {
        "text": lambda: llm.generate([spans], params, use_tqdm=False),
        "tokens": lambda: llm.generate([{"prompt_token_ids": llm.get_tokenizer().encode(spans)}], params,
                                       use_tqdm=False),
        "chat": lambda: llm.chat([{"role": "user", "content": "What is <|latent_pad|> plus two?"}], params,
                                 use_tqdm=False),
        "structured": lambda: llm.generate([prompt], SamplingParams(
            temperature=0, max_tokens=4, structured_outputs=StructuredOutputsParams(choice=["four", "five"])),
            use_tqdm=False),
    }
    result = {}
    for name, call in tries.items():
        try:
            call()
            result[name] = None
        except Exception as error:
            result[name] = [type(error).__name__, isinstance(error, ValueError), str(error)]
    out = llm.generate([prompt + "<|latent_start|>"], params, use_tqdm=False)
    result["ends_in_start"] = list(out[0].outputs[0].token_ids)
    print("RESULT", json.dumps(result))
"""


def test_offline_requests_are_refused_before_the_engine(fixtures):
    """`LLM.generate` / `LLM.chat` raise `VLLMValidationError` (vLLM's client error, HTTP 400 in the server) for a
    prompt holding latent slots (text, token ids, chat) and for structured output; a prompt ending in
    `<|latent_start|>` opens a span and is served (one engine, its own process)."""
    result = subprocess.run([sys.executable, "-c", OFFLINE, fixtures["checkpoint"], fixtures["prompts"][1],
                             str(fixtures["max_new_tokens"])], capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    refusals = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for name in ("text", "tokens", "chat"):
        assert refusals[name] is not None, f"{name}: a prompt with latent slots was not refused"
        assert refusals[name][0] == "VLLMValidationError", refusals[name]
        assert "a prompt cannot carry latent vectors" in refusals[name][2], refusals[name]
    assert refusals["structured"] is not None, "structured output was not refused"
    assert refusals["structured"][0] == "VLLMValidationError" and "structured output" in refusals["structured"][2]
    assert refusals["ends_in_start"] == fixtures["cases"]["ends_in_start_pca"]


GAP_ONLY = """
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from gap_vllm.processing import check_prompt_token_ids, refuse_structured_outputs, serves_gap_model

assert not serves_gap_model()
refuse_structured_outputs(SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"])))
check_prompt_token_ids([1, 2, 270], None)  # not a GAP model: no latent slot id
from vllm.exceptions import VLLMValidationError
try:
    check_prompt_token_ids([1, 270, 3, 270], 270)
except VLLMValidationError as error:
    assert "cannot carry latent vectors" in str(error) and "position(s) 1, 3" in str(error), str(error)
    print("OK")
"""


def test_refusals_apply_to_gap_models_only():
    """Without a GAP engine in the process, structured output passes the plugin's check (other models are served
    with it as without the plugin), and the prompt check needs GAP's slot id."""
    result = subprocess.run([sys.executable, "-c", GAP_ONLY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, (result.stdout + result.stderr)[-4000:]
