"""The static-cache path of GAP generate: exact against the dynamic path, and one compiled step that never
recompiles across text -> latent -> text transitions."""

import pytest
import torch
from transformers import CompileConfig

from trainers.tiny import build_tiny_qwen2_5_vl
from testing_utils import force_span, question_batch

EAGER_FULLGRAPH = CompileConfig(backend="eager", fullgraph=True)


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.latents) == len(b.latents)
    for x, y in zip(a.latents, b.latents):
        assert x.shape == y.shape
        if x.numel():
            assert (x - y).abs().max() < 1e-4


@pytest.mark.parametrize("compiled", [False, True])
def test_static_equals_dynamic_with_spans_at_different_steps(tiny_gap, compiled):
    model, processor = tiny_gap
    batch = question_batch(processor)
    kwargs = dict(max_new_tokens=20, do_sample=False, return_latents=True,
                  logits_processor=force_span(model, batch, {0: 1, 1: 4, 2: 6}))
    with torch.no_grad():
        dynamic = model.generate(**batch, **kwargs)
        static = model.generate(**batch, cache_implementation="static",
                                compile_config=EAGER_FULLGRAPH if compiled else None, **kwargs)
    assert sum(x.shape[0] for x in dynamic.latents) >= 3
    _assert_same(dynamic, static)


def test_static_without_spans_equals_stock_static_generate(tiny_gap):
    model, processor = tiny_gap
    stock = build_tiny_qwen2_5_vl(seed=0)[0]
    batch = question_batch(processor)
    kwargs = dict(max_new_tokens=12, do_sample=False, suppress_tokens=[model.config.latent_start_token_id],
                  cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **kwargs), stock.generate(**batch, **kwargs))


@pytest.mark.parametrize("intervention", ["zero", "noise", "shuffle", "mean", "drop"])
def test_interventions_on_the_compiled_path(tiny_gap, intervention):
    model, processor = tiny_gap
    batch = question_batch(processor, rows=[0, 2])
    kwargs = dict(max_new_tokens=14, do_sample=False, return_latents=True, latent_intervention=intervention,
                  latent_intervention_seed=3, sequence_bias={(model.config.latent_start_token_id,): 100.0},
                  max_latent_spans=1)
    with torch.no_grad():
        dynamic = model.generate(**batch, **kwargs)
        compiled = model.generate(**batch, cache_implementation="static", compile_config=EAGER_FULLGRAPH, **kwargs)
    _assert_same(dynamic, compiled)


def test_sampling_on_the_static_path_matches_dynamic(tiny_gap):
    model, processor = tiny_gap
    batch = question_batch(processor, rows=[1, 3])
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, return_latents=True,
                  sequence_bias={(model.config.latent_start_token_id,): 2.0})
    outs = []
    for cache in (None, "static"):
        torch.manual_seed(11)
        with torch.no_grad():
            outs.append(model.generate(**batch, cache_implementation=cache, **kwargs))
    _assert_same(*outs)


def test_compiled_step_has_no_recompilation_across_transitions(tiny_gap):
    model, processor = tiny_gap
    pad, start, end = model.config.latent_token_ids
    batch = question_batch(processor, rows=[0, 1])

    def run(steps):
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=24, do_sample=False, cache_implementation="static",
                                  compile_config=EAGER_FULLGRAPH, logits_processor=force_span(model, batch, steps))

    torch._dynamo.reset()
    run({0: 2})  # warm-up: compiles the step once
    torch.compiler.set_stance("fail_on_recompile")
    try:
        out = run({0: {1, 9}, 1: {3, 11}})  # two text -> latent -> text transitions per row, at other steps
    finally:
        torch.compiler.set_stance("default")
    new = out[:, batch["input_ids"].shape[1]:]
    assert (new == start).sum(-1).tolist() == [2, 2]
    assert (new == end).sum(-1).tolist() == [2, 2]


def test_bf16_static_compiled(fresh_tiny_gap):
    model, processor = fresh_tiny_gap
    model = model.to(torch.bfloat16)
    batch = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in question_batch(processor, rows=[0]).items()}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False, cache_implementation="static",
                             compile_config=EAGER_FULLGRAPH, return_latents=True,
                             logits_processor=force_span(model, batch, {0: 0}))
    assert out.latents[0].dtype == torch.bfloat16 and out.latents[0].shape[0] == 1
