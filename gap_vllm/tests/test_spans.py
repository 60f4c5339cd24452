"""The span processor against vLLM's own loaders and interfaces, both model runners (no engine started).

Model Runner V2 (the default of CUDA vLLM wherever Triton is present) rejects entry-point logits processors that
implement only the V1 interface, for every model: the plugin's class implements both, and here vLLM's own V2 loader
functions load it, build it with V2's request state and validate per-request options, as the CUDA build would.
"""

import pytest
import torch

from gap_vllm.config import GapSpec
from gap_vllm.latent_store import SLOTS_LEFT, LatentStore, SpanTokens
from gap_vllm.spans import GapLatentSpanProcessor, GapServing, _SERVING

PAD, START, END, K = 270, 271, 272, 4


def engine_config(model_dir):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model_dir, dtype="float32", max_model_len=256, max_num_seqs=4,
                      enable_prefix_caching=False).create_engine_config()


@pytest.fixture(scope="module")
def gap_config(fixtures):
    return engine_config(fixtures["checkpoint"])


def serving(vllm_config):
    """What the GAP model creates at load (`model.py`), without the model."""
    spec = GapSpec.from_hf_config(vllm_config.model_config.hf_config)
    tokens = SpanTokens(pad=spec.pad_id, start=spec.start_id, end=spec.end_id, eos=0)
    store = LatentStore(8, spec.latent_capacity, vllm_config.model_config.hf_config.text_config.hidden_size, tokens)
    return GapServing(spec, store, 4, vllm_config)


def test_entry_point_loads_in_both_runners():
    from vllm.v1.sample.logits_processor import _load_logitsprocs_plugins
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_plugins, build_custom_logits_processors_params_validator,
    )

    assert GapLatentSpanProcessor in _load_logitsprocs_plugins()
    assert GapLatentSpanProcessor in _load_v2_logitsprocs_plugins()
    validate = build_custom_logits_processors_params_validator(())  # what the V2 frontend runs per request
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    validate(SamplingParams(extra_args={"latent_feedback": "raw"}))
    with pytest.raises(VLLMValidationError, match="latent_feedback"):
        validate(SamplingParams(extra_args={"latent_feedback": "nope"}))


def test_v1_and_v2_interfaces_apply_the_same_rule(gap_config):
    from vllm.v1.sample.logits_processor import BatchUpdate, build_logitsprocs
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs
    from vllm import SamplingParams

    state = serving(gap_config)
    spec = state.spec
    try:
        # As `build_custom_logits_processors` builds them; V2's token buffers need pinned memory (a GPU), and the
        # processor reads none of them.
        req_states = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=4, vocab_size=400,
                                            all_token_ids=None, prompt_len=None, prefill_len=None, total_len=None)
        v2 = [cls(gap_config, req_states) for cls in _load_v2_logitsprocs(()) if cls is GapLatentSpanProcessor]
        v1 = [p for p in build_logitsprocs(gap_config, torch.device("cpu"), False, False).all
              if isinstance(p, GapLatentSpanProcessor)]
        assert len(v1) == len(v2) == 1 and v1[0].runner == "V1" and v2[0].runner == "V2"
        # Two requests: one whose prompt ends in <|latent_start|> (a span is open), one dropping spans.
        opened = SamplingParams(temperature=0)
        dropped = SamplingParams(temperature=0, extra_args={"latent_intervention": "drop"})
        v1[0].update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                       added=[(0, opened, [1, 2, spec.start_id], []), (1, dropped, [1, 2], [])]))
        assert v2[0].add_request(0, opened) and v2[0].add_request(1, dropped)
        state.index_to_slot[:2] = state.row_slot[:2]  # V2's model state maps its request indices to the same slots
        ids = torch.tensor([1, 2, spec.start_id, 1, 2])  # the prompts, prefilled
        state.store.feed_step(ids, torch.zeros(5, state.store.hidden_size), torch.tensor([0, 3, 5]),
                              torch.tensor([3, 2]), state.row_slot[:2])
        assert state.store.state[state.row_slot[0], SLOTS_LEFT] == spec.num_latent_tokens
        logits = torch.randn(2, 400)
        logits[:, spec.start_id] += 10
        got_v1 = v1[0].apply(logits.clone())
        mapping = torch.tensor([0, 1])
        ctx = LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=mapping.numpy(),
                            expanded_local_pos=torch.zeros(2, dtype=torch.long), input_ids=ids[[2, 4]],
                            pos=torch.tensor([2, 1]), seq_lens_upper_bound_np=mapping.numpy() + 2)
        got_v2 = v2[0].apply(logits.clone(), ctx)
        torch.testing.assert_close(got_v1, got_v2)
        assert got_v1[0].argmax() == spec.pad_id and got_v1[1, spec.start_id] == float("-inf")
    finally:
        _SERVING.pop(gap_config.instance_id, None)


def test_other_models_are_left_alone(fixtures):
    """A vLLM with the plugin installed serving a model that is not a GAP checkpoint: the processor changes nothing
    on either interface (the engine test serves such a model end to end)."""
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm import SamplingParams

    config = engine_config(fixtures["stock_text"])
    v1 = GapLatentSpanProcessor(config, torch.device("cpu"), False)
    v2 = GapLatentSpanProcessor(config, None)
    v1.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, SamplingParams(), [1, 2], [])]))
    assert not v2.add_request(0, SamplingParams())
    logits = torch.randn(1, 50)
    assert torch.equal(v1.apply(logits.clone()), logits) and torch.equal(v2.apply(logits.clone(), None), logits)
    assert v1.serving() is None and v2.serving() is None


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
        feedback="ema_norm", latent_capacity=16 * 6,
    )
    config.serving_latents_per_request = 40
    assert GapSpec.from_hf_config(config).latent_capacity == 40
    assert gap_vllm.model.GapLatentHead is GapLatentHead


def test_v1_rows_filled_by_condense_release_their_request(gap_config):
    """vLLM's `condense` moves the last row into a removed one and leaves that index out of `BatchUpdate.removed`
    (its `pop_removed`): the request that row held has left the batch and must give its slot back (the engine fuzz
    ran out of slots when it did not)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm import SamplingParams

    state = serving(gap_config)
    try:
        params = [SamplingParams(temperature=0) for _ in range(4)]
        state.update_v1(BatchUpdate(batch_size=4, removed=[], moved=[],
                                    added=[(i, p, [1, 2], []) for i, p in enumerate(params)]))
        table = state.store.slot_table
        assert len(table.live) == 4
        # Row 1 finished; condense moved row 3 into it (index 1 popped from `removed`).
        state.update_v1(BatchUpdate(batch_size=3, removed=[], added=[],
                                    moved=[(3, 1, MoveDirectionality.UNIDIRECTIONAL)]))
        assert set(table.live) == {id(params[0]), id(params[2]), id(params[3])}
        assert id(params[1]) in table.parked
        assert state.row_slot[:3].tolist() == [table.live[id(p)] for p in (params[0], params[3], params[2])]
    finally:
        _SERVING.pop(gap_config.instance_id, None)
