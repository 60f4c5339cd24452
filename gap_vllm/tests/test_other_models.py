"""A vLLM with the plugin installed serves a model that is not a GAP checkpoint exactly as without it: the span
processor (loaded for every model through the entry point) leaves it alone, and its greedy tokens equal
transformers' `generate` (which stock vLLM matches on this model)."""

from conftest import run


def test_text_model_served_unchanged(fixtures):
    from vllm import LLM

    engine = LLM(model=fixtures["stock_text"], dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
                 kv_cache_memory_bytes=1 << 20, block_size=32, enforce_eager=True)
    from gap_vllm.spans import serving_for

    assert serving_for(engine.llm_engine.vllm_config) is None
    got, _ = run(engine, fixtures["prompts"], fixtures["max_new_tokens"])
    assert got == fixtures["cases"]["stock_text"]
