"""The per-request span state follows the tokens actually sampled (no engine): a logits processor that runs after
the plugin's (vLLM applies `LLM(logits_processors=...)` after the entry-point ones) may override what it forced."""

from vllm import SamplingParams

from gap_vllm.config import GapSpec
from gap_vllm.spans import RequestState

PAD, START, END, K = 270, 271, 272, 4
SPEC = GapSpec(pad_id=PAD, start_id=START, end_id=END, num_latent_tokens=K, max_latents=K, span_rule="fixed",
               feedback="pca")
PROMPT = [1, 2, 3]


def state(**extra):
    output = []
    return RequestState(SPEC, SamplingParams(extra_args=extra or None), PROMPT, output), output


def test_forced_start_opens_no_span_under_drop():
    s, output = state(latent_intervention="drop")
    output += [5, START]  # another processor forced <|latent_start|> although drop blocks it
    s.advance(SPEC)
    assert s.slots_left == 0 and s.spans == 0 and not s.end_due


def test_forced_start_opens_no_span_past_max_latent_spans():
    s, output = state(max_latent_spans=1)
    output += [START] + [PAD] * K + [END]
    s.advance(SPEC)
    assert s.spans == 1 and s.slots_left == 0 and not s.plain
    output.append(START)
    s.advance(SPEC)
    assert s.spans == 1 and s.slots_left == 0


def test_slot_token_outside_a_span_is_plain():
    s, output = state()
    output += [PAD, 7, START]
    s.advance(SPEC)
    assert s.plain == {len(PROMPT)} and s.slots_left == K
    output += [PAD] * K + [END, PAD]
    s.advance(SPEC)
    assert s.plain == {len(PROMPT), len(PROMPT) + 3 + K + 1} and s.slots_left == 0 and not s.end_due


def test_serving_reads_the_packages_config_and_uses_its_head():
    """One owner: the spec comes from `modeling_gap`'s config class, the head is `modeling_gap`'s module."""
    from modeling_gap import GapQwen2_5VLConfig
    from modeling_gap.modeling_gap import GapLatentHead

    import gap_vllm.model

    config = GapQwen2_5VLConfig(latent_pad_token_id=PAD, latent_start_token_id=START, latent_end_token_id=END,
                                num_latent_tokens=K, latent_span_rule="sampled_end", latent_max_tokens=6,
                                latent_feedback="ema_norm")
    assert GapSpec.from_hf_config(config) == GapSpec(
        pad_id=PAD, start_id=START, end_id=END, num_latent_tokens=K, max_latents=6, span_rule="sampled_end",
        feedback="ema_norm",
    )
    assert gap_vllm.model.GapLatentHead is GapLatentHead
