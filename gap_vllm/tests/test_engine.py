"""GAP served by vLLM (in-process engine, CPU, fp32, greedy) against GAP `generate`, token for token, in vLLM's eager
mode and in its compiled mode with chunked prefill (`conftest.ENGINE_MODES`)."""

import pytest
from PIL import Image

from conftest import run, serving_state


def test_registered_without_prefix_caching(llm, fixtures):
    config = llm.llm_engine.vllm_config
    assert config.model_config.architecture == "GapQwen2_5VLForConditionalGeneration"
    assert not config.cache_config.enable_prefix_caching


def test_single_request(llm, fixtures):
    got, _ = run(llm, fixtures["prompts"][:1], fixtures["max_new_tokens"])
    assert got[0] == fixtures["cases"]["batch_pca"][0]
    assert fixtures["ids"]["start"] in got[0]


@pytest.mark.parametrize("feedback", ["pca", "raw", "ema_norm"])
def test_batch_spans_at_different_steps(llm, fixtures, feedback):
    refs = fixtures["cases"][f"batch_{feedback}"]
    start = fixtures["ids"]["start"]
    steps = [r.index(start) if start in r else None for r in refs]
    assert len(refs) >= 5 and None in steps and len({s for s in steps if s is not None}) >= 2
    extra = {} if feedback == "pca" else {"latent_feedback": feedback}  # pca: the checkpoint's own feedback
    got, _ = run(llm, fixtures["prompts"], fixtures["max_new_tokens"], **extra)
    assert got == refs


@pytest.mark.parametrize("feedback", ["pca", "raw", "ema_norm"])
def test_prompt_ending_in_latent_start(llm, fixtures, feedback):
    prompt = fixtures["prompts"][1] + "<|latent_start|>"
    got, _ = run(llm, [prompt], fixtures["max_new_tokens"], latent_feedback=feedback)
    ref = fixtures["cases"][f"ends_in_start_{feedback}"]
    assert got[0] == ref and ref[:4] == [fixtures["ids"]["pad"]] * 4


def test_zero_intervention_is_used(llm, fixtures):
    got, _ = run(llm, fixtures["prompts"], fixtures["max_new_tokens"], latent_intervention="zero")
    assert got == fixtures["cases"]["zero"]
    assert got != fixtures["cases"]["batch_pca"]  # the fed latents change the tokens


def test_drop_and_max_spans(llm, fixtures):
    n = fixtures["max_new_tokens"]
    dropped, _ = run(llm, fixtures["prompts"], n, latent_intervention="drop")
    assert dropped == fixtures["cases"]["drop"]
    assert all(fixtures["ids"]["start"] not in row for row in dropped)
    one, _ = run(llm, fixtures["prompts"], n, max_latent_spans=1)
    assert one == fixtures["cases"]["max_spans_1"]


def test_sampled_end_rule(llm, fixtures):
    got, _ = run(llm, fixtures["prompts"], fixtures["max_new_tokens"], latent_span_rule="sampled_end",
                 latent_max_tokens=6)
    ref = fixtures["cases"]["sampled_end"]
    assert got == ref
    pad, end = fixtures["ids"]["pad"], fixtures["ids"]["end"]
    lengths = [len(span.split(",")) for row in ref for span in
               ",".join("P" if t == pad else ("|" if t == end else "x") for t in row).replace(",", "").split("|")
               if "P" in span]
    assert lengths  # spans exist


def test_image_request(llm, fixtures):
    image = Image.open(fixtures["image"]).convert("RGB")
    prompt = {"prompt": fixtures["image_prompt"], "multi_modal_data": {"image": image}}
    got, _ = run(llm, [prompt], fixtures["max_new_tokens"])
    assert got[0] == fixtures["cases"]["image"]
    assert fixtures["ids"]["start"] in got[0]


def test_prompt_with_latent_slots_is_refused(llm, fixtures):
    """A prompt cannot carry latent vectors, so a prompt holding latent slots (a previous answer with its spans) is
    refused before it reaches the engine (the server answers 400), and the engine serves on."""
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    n = fixtures["max_new_tokens"]
    prompt = fixtures["prompts"][4]
    follow_up = llm.get_tokenizer().encode(prompt) + fixtures["cases"]["batch_pca"][4]
    with pytest.raises(VLLMValidationError, match="a prompt cannot carry latent vectors"):
        run(llm, [TokensPrompt(prompt_token_ids=follow_up)], n)
    again, _ = run(llm, [prompt], n)
    assert again[0] == fixtures["cases"]["batch_pca"][4]


def test_preemption_replays_latents(llm, fixtures):
    """24 requests need about twice the KV cache: vLLM preempts and recomputes some; their latent slots are fed
    the recorded latents again, so every output still equals GAP generate's."""
    serving = serving_state(llm)
    before = serving.resumed
    prompts, refs, extras = [], [], []
    from vllm import SamplingParams

    for feedback in ("pca", "raw", "ema_norm"):
        prompts += fixtures["prompts"]
        refs += fixtures["cases"][f"batch_{feedback}"]
        extras += [{"latent_feedback": feedback}] * len(fixtures["prompts"])
    for feedback in ("pca", "raw", "ema_norm"):
        prompts.append(fixtures["prompts"][1] + "<|latent_start|>")
        refs.append(fixtures["cases"][f"ends_in_start_{feedback}"])
        extras.append({"latent_feedback": feedback})
    params = [SamplingParams(temperature=0, max_tokens=fixtures["max_new_tokens"], extra_args=e) for e in extras]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outputs]
    assert serving.resumed > before, "the KV cache was large enough: no request was preempted"
    assert got == refs


def test_slot_token_sampled_outside_a_span(llm, fixtures):
    """A model may sample `<|latent_pad|>` outside a span (here: a logit bias makes it): it is a plain token fed
    its token embedding, as in GAP generate; the engine must not fail for want of a latent (issue 16's benchmark
    stopped on `no latent was recorded for the latent slot at sequence index 84`)."""
    from vllm import SamplingParams

    ref = fixtures["cases"]["stray_pad"]
    params = SamplingParams(temperature=0, max_tokens=fixtures["max_new_tokens"],
                            logit_bias={fixtures["ids"]["pad"]: fixtures["pad_bias"]})
    outputs = llm.generate(fixtures["prompts"], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == ref
    dropped, _ = run(llm, fixtures["prompts"], fixtures["max_new_tokens"], latent_intervention="drop")
    assert dropped == fixtures["cases"]["drop"]  # the engine serves on


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_batches_equal_generate(llm, fixtures, seed):
    """A fuzz of the engine's batch changes: 64 requests of random prompts, feedback modes, interventions and lengths
    (a request cut at n tokens must give the first n of GAP generate's), arriving in random order into a KV cache
    that holds about half of them, so vLLM adds, removes, moves, preempts and resumes rows (chunked prefill too in
    the compiled engine). Every output equals GAP generate's."""
    import random

    from vllm import SamplingParams

    rng = random.Random(seed)
    cases = {"pca": "batch_pca", "raw": "batch_raw", "ema_norm": "batch_ema_norm", "zero": "zero", "drop": "drop"}
    prompts, params, refs = [], [], []
    for _ in range(64):
        row = rng.randrange(len(fixtures["prompts"]))
        case = rng.choice(list(cases))
        extra = {"latent_intervention": case} if case in ("zero", "drop") else {"latent_feedback": case}
        n = rng.randint(15, fixtures["max_new_tokens"])
        prompts.append(fixtures["prompts"][row])
        params.append(SamplingParams(temperature=0, max_tokens=n, extra_args=extra))
        refs.append(fixtures["cases"][cases[case]][row][:n])
    serving = serving_state(llm)
    resumed = serving.resumed
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == refs
    assert serving.resumed > resumed, "no request was preempted"


def test_compiled_steps_do_not_recompile(llm, fixtures):
    """The compiled GAP steps are compiled at start (warm-up) for every batch shape: a single request (one row, one
    token, a chunked prefill of one row), a batch, an image prompt, add no graph (a recompile would stall requests
    for seconds). In eager mode nothing is compiled."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from gap_vllm.latent_store import LatentStore
    from gap_vllm.model import GapQwen2_5VLForConditionalGeneration

    codes = (GapQwen2_5VLForConditionalGeneration._record_and_feed.__code__, LatentStore.apply_span_rule.__code__)
    before = [len(_debug_get_cache_entry_list(code)) for code in codes]
    run(llm, fixtures["prompts"][:1], fixtures["max_new_tokens"])
    run(llm, fixtures["prompts"][:3], fixtures["max_new_tokens"])
    image = Image.open(fixtures["image"]).convert("RGB")
    run(llm, [{"prompt": fixtures["image_prompt"], "multi_modal_data": {"image": image}}] * 2, 8)
    after = [len(_debug_get_cache_entry_list(code)) for code in codes]
    assert after == before
    if llm.llm_engine.vllm_config.compilation_config.mode == 0:  # eager
        assert after == [0, 0]
    else:
        assert 1 <= after[0] and 1 <= after[1]
