"""The transformers contract, checked from outside: a GAP model is a Qwen2.5-VL model under every documented option.

A reusable check, not one test per bug. `GAP_CONFIGS` lists the GAP configurations under test and `GENERATE_OPTIONS`
the `generate` options stock Qwen2.5-VL supports; each pair runs on stock and GAP with the same weights (batch 1
and 3, with and without an image) and must agree token for token and within `ATOL` on every returned tensor. A new
option of transformers is one more line in `GENERATE_OPTIONS`; a new GAP configuration one more line in
`GAP_CONFIGS`. With a span forced open, the options that apply keep GAP's own results (`SPAN_OPTIONS`).
"""


import pytest
import torch
from transformers import (
    CompileConfig,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2_5_VLForConditionalGeneration,
)

from testing_utils import COLORS, chat, solid_image
from modeling_gap import GapQwen2_5VLForConditionalGeneration
from trainers.tiny import build_tiny_gap, build_tiny_qwen2_5_vl

ATOL = 1e-5
SEED = 0

# GAP configurations the contract holds for (fields of `GapQwen2_5VLConfig`, through `build_tiny_gap`).
GAP_CONFIGS = {
    "gap-pca-k4": dict(latent_feedback="pca", num_latent_tokens=4),
    "mirage-raw-sampled-end": dict(preset="mirage", latent_feedback="raw"),
    "monet-ema-k3": dict(preset="monet", latent_feedback="ema_norm", num_latent_tokens=3),
    # eager attention: the only implementation that returns attention weights (sdpa returns empty tuples, as stock)
    "gap-pca-eager-attention": dict(latent_feedback="pca", num_latent_tokens=2, attn_implementation="eager"),
}

# `generate` options of stock Qwen2.5-VL (every `GenerationConfig` field GAP must honour). `num_beams > 1` is the one
# documented exception (refused, `test_beam_search_is_refused_clearly`).
GENERATE_OPTIONS = {
    "greedy": dict(),
    "sample": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    "no_cache": dict(use_cache=False),
    "no_cache_sample": dict(use_cache=False, do_sample=True, top_k=10),
    "dict_scores_logits": dict(return_dict_in_generate=True, output_scores=True, output_logits=True),
    "hidden_states": dict(return_dict_in_generate=True, output_hidden_states=True),
    "attentions": dict(return_dict_in_generate=True, output_attentions=True, output_hidden_states=True),
    "no_cache_hidden_states": dict(use_cache=False, return_dict_in_generate=True, output_hidden_states=True),
    "static": dict(cache_implementation="static"),
    "static_dict": dict(cache_implementation="static", return_dict_in_generate=True, output_logits=True,
                        output_hidden_states=True),
    "penalties": dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5),
    "min_p_sample": dict(do_sample=True, min_p=0.05),
}

# Every option runs at batch 1 and 3, with and without an image, on the first configuration; the other
# configurations (other feedback, presets, attention) run the options where they change the code path.
FULL_CONFIG = "gap-pca-k4"
CORE_OPTIONS = ("greedy", "sample", "no_cache", "dict_scores_logits", "attentions", "static")
GENERATE_CASES = [
    (config, option, batch_size, with_image)
    for config in GAP_CONFIGS
    for option in GENERATE_OPTIONS
    for batch_size in (1, 3)
    for with_image in (True, False)
    if config == FULL_CONFIG or (option in CORE_OPTIONS and (batch_size, with_image) in ((1, False), (3, True)))
]

# Options that must hold with a span open too: GAP's own cached loop is the reference.
SPAN_OPTIONS = ("no_cache", "dict_scores_logits", "hidden_states", "attentions", "no_cache_hidden_states",
                "static_dict")


class ForceTokenAt(LogitsProcessor):
    """Forces `token` at generation step `step` (counted from the prompt's end) in every row."""

    def __init__(self, token, step, prompt_length):
        self.token, self.step, self.prompt_length = token, step, prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length == self.step:
            scores[:] = torch.finfo(scores.dtype).min
            scores[:, self.token] = 0
        return scores


@pytest.fixture(scope="module", params=list(GAP_CONFIGS))
def pair(request):
    return _build_pair(request.param)


_PAIRS = {}


def _build_pair(name):
    if name not in _PAIRS:
        _PAIRS.clear()  # one configuration's models at a time
        _PAIRS[name] = _make_pair(name)
    return _PAIRS[name]


def _make_pair(name):
    """(stock model, GAP model with the same weights, GAP processor, config name)."""
    options = dict(GAP_CONFIGS[name])
    attention = options.pop("attn_implementation", None)
    stock = build_tiny_qwen2_5_vl(seed=SEED)[0]
    model, processor = build_tiny_gap(seed=SEED, **options)
    if attention is not None:
        stock.set_attn_implementation(attention)
        model.set_attn_implementation(attention)
    if model.config.latent_feedback == "pca":
        torch.manual_seed(1)  # a fitted-looking head: not the identity
        model.latent_head.set_pca(torch.randn(64) * 0.1, torch.linalg.qr(torch.randn(64, 16))[0], torch.rand(16) + 0.5)
    if model.config.latent_feedback == "ema_norm":
        model.latent_head.ema_norm.fill_(3.0)
    return stock, model, processor, name


def make_batch(processor, batch_size, with_image):
    processor.tokenizer.padding_side = "left"
    questions = ["Q?", "What colour is the big square?", "Where is the light corner?"][:batch_size]
    if with_image:
        return processor(
            images=[solid_image(COLORS[i]) for i in range(batch_size)],
            text=[chat(processor, q) for q in questions], padding=True, return_tensors="pt",
        )
    texts = [
        processor.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    return processor(text=texts, padding=True, return_tensors="pt")


def run_generate(model, batch, seed=SEED, **options):
    options.setdefault("max_new_tokens", 6)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**batch, **options)


def assert_close_tree(ours, theirs, where="output"):
    """Same structure, same tensors (ids exactly, floats within ATOL) in two `generate` outputs."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{where}: GAP returned {type(ours).__name__}, stock a tensor"
        assert ours.shape == theirs.shape, f"{where}: shape {tuple(ours.shape)} != stock {tuple(theirs.shape)}"
        if theirs.dtype.is_floating_point:
            finite = torch.isfinite(theirs)
            assert torch.equal(finite, torch.isfinite(ours)), f"{where}: non-finite entries differ"
            diff = (ours[finite].float() - theirs[finite].float()).abs().max() if finite.any() else 0
            assert diff <= ATOL, f"{where}: differs from stock by {float(diff):.3g}"
        else:
            assert torch.equal(ours, theirs), f"{where}: differs from stock"
    elif isinstance(theirs, (tuple, list)):
        assert isinstance(ours, (tuple, list)) and len(ours) == len(theirs), (
            f"{where}: GAP gave {type(ours).__name__} of {len(ours) if hasattr(ours, '__len__') else '-'}, "
            f"stock {len(theirs)}"
        )
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close_tree(a, b, f"{where}[{i}]")
    else:
        assert (ours is None) == (theirs is None), f"{where}: GAP {type(ours).__name__}, stock {type(theirs).__name__}"


def compare_outputs(ours, theirs):
    if isinstance(theirs, torch.Tensor):
        return assert_close_tree(ours, theirs, "sequences")
    for field in ("sequences", "scores", "logits", "hidden_states", "attentions"):
        assert_close_tree(getattr(ours, field), getattr(theirs, field), field)


# ---- generate, no span: every option, as stock -----------------------------------------------------------------
@pytest.mark.parametrize(
    "config, option, batch_size, with_image", GENERATE_CASES,
    ids=[f"{c}-{o}-b{b}-{'image' if i else 'text'}" for c, o, b, i in GENERATE_CASES],
)
def test_generate_without_spans_is_stock(config, option, batch_size, with_image):
    stock, model, processor, _ = _build_pair(config)
    batch = make_batch(processor, batch_size, with_image)
    # The tiny random model could emit the start token; stock and GAP both suppress it, so no span opens.
    options = dict(GENERATE_OPTIONS[option], suppress_tokens=[model.config.latent_start_token_id])
    compare_outputs(run_generate(model, batch, **options), run_generate(stock, batch, **options))


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_generate_from_inputs_embeds_is_stock(pair, batch_size, cache_implementation):
    stock, model, processor, _ = pair
    batch = make_batch(processor, batch_size, with_image=False)
    embeds = stock.get_input_embeddings()(batch["input_ids"])
    options = dict(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=6,
                   suppress_tokens=[model.config.latent_start_token_id], cache_implementation=cache_implementation,
                   return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        compare_outputs(model.generate(**options), stock.generate(**options))


# ---- generate with a span open: options keep GAP's own results -------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("option", SPAN_OPTIONS)
def test_options_with_a_forced_span(pair, option, batch_size):
    _, model, processor, _ = pair
    batch = make_batch(processor, batch_size, with_image=True)
    prompt = batch["input_ids"].shape[1]
    force = LogitsProcessorList([ForceTokenAt(model.config.latent_start_token_id, 1, prompt)])
    span = dict(logits_processor=force, max_latent_spans=1, return_latents=True, max_new_tokens=9)
    reference = run_generate(model, batch, **span, **GENERATE_OPTIONS["dict_scores_logits"])
    ours = run_generate(model, batch, **span, **GENERATE_OPTIONS[option])
    assert (reference.sequences == model.config.latent_pad_token_id).any()  # the span really opened
    assert_close_tree(ours.sequences, reference.sequences, "sequences")
    assert_close_tree(ours.latents, reference.latents, "latents")
    steps = reference.sequences.shape[1] - prompt
    for field in ("scores", "logits"):
        if getattr(ours, field) is not None:
            assert_close_tree(getattr(ours, field), getattr(reference, field), field)
    for field in ("hidden_states", "attentions"):
        if GENERATE_OPTIONS[option].get(f"output_{field}"):
            per_step = getattr(ours, field)
            # one entry per generated position, latent steps included; each a tuple over layers
            assert per_step is not None and len(per_step) == steps, f"{field}: {per_step and len(per_step)} != {steps}"
            layers = model.config.text_config.num_hidden_layers
            expected = layers + 1 if field == "hidden_states" else (
                layers if model.config._attn_implementation == "eager" else 0)
            assert all(isinstance(entry, tuple) and len(entry) == expected for entry in per_step), field


def test_no_cache_span_logits_match_a_full_forward(pair):
    """use_cache=False recomputes the whole sequence each step with the fed latents at their slots."""
    _, model, processor, _ = pair
    batch = make_batch(processor, 3, with_image=True)
    prompt = batch["input_ids"].shape[1]
    force = LogitsProcessorList([ForceTokenAt(model.config.latent_start_token_id, 2, prompt)])
    cached = run_generate(model, batch, logits_processor=force, max_latent_spans=1, return_latents=True,
                          output_logits=True)
    uncached = run_generate(model, batch, logits_processor=force, max_latent_spans=1, return_latents=True,
                            output_logits=True, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert_close_tree(uncached.logits, cached.logits, "logits")


# ---- assisted and prompt-lookup decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_gap_as_assistant_model_gives_stock_tokens(pair, with_image):
    stock, model, processor, _ = pair
    batch = make_batch(processor, 1, with_image)
    options = dict(do_sample=False, suppress_tokens=[model.config.latent_start_token_id], max_new_tokens=12)
    with torch.no_grad():
        plain = stock.generate(**batch, **options)
        assisted = stock.generate(**batch, assistant_model=model, **options)
    assert torch.equal(assisted, plain)


@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup"])
def test_assisted_decoding_of_a_gap_model(pair, mode):
    stock, model, processor, _ = pair
    batch = make_batch(processor, 1, with_image=True)
    extra = dict(assistant_model=build_tiny_gap(seed=SEED, **_options_of(pair))[0]) if mode == "assistant" else dict(
        prompt_lookup_num_tokens=3)
    options = dict(do_sample=False, max_new_tokens=10)
    with torch.no_grad(), pytest.raises(ValueError, match="latent"):
        model.generate(**batch, **options, **extra)  # the model can open spans: refused, never silently different
    # A call that cannot open a span is stock assisted decoding, token for token.
    with torch.no_grad():
        ours = model.generate(**batch, **options, **extra, latent_intervention="drop")
        theirs = stock.generate(**batch, **options, **extra, suppress_tokens=[model.config.latent_start_token_id])
    assert torch.equal(ours, theirs)


def _options_of(pair):
    return {k: v for k, v in GAP_CONFIGS[pair[3]].items() if k != "attn_implementation"}


def test_beam_search_is_refused_clearly(pair):
    _, model, processor, _ = pair
    with pytest.raises((ValueError, NotImplementedError), match="num_beams"):
        run_generate(model, make_batch(processor, 1, True), num_beams=2)


# ---- forward ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_forward_return_dict_false_is_stock(pair, with_image):
    stock, model, processor, _ = pair
    batch = make_batch(processor, 3, with_image)
    with torch.no_grad():
        ours = model(**batch, return_dict=False)
        theirs = stock(**batch, return_dict=False)
    assert isinstance(ours, tuple)
    assert_close_tree(ours[0], theirs[0], "logits")


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_forward_fills_a_cache_passed_under_either_name(pair, name):
    from modeling_gap.transformers_compat import CACHE_NAME

    if name != CACHE_NAME and CACHE_NAME == "past_key_values":
        pytest.skip("transformers < 5.24: stock Qwen2.5-VL takes the cache only as `past_key_values`")
    stock, model, processor, _ = pair
    batch = make_batch(processor, 3, with_image=True)
    caches = {}
    for which, m in (("gap", model), ("stock", stock)):
        cache = DynamicCache(config=m.config.get_text_config(decoder=True))
        with torch.no_grad():
            out = m(**batch, **{name: cache}, use_cache=True)
        assert cache.get_seq_length() == batch["input_ids"].shape[1], f"{which}: the caller's cache was not filled"
        caches[which] = (cache, out.logits)
    assert_close_tree(caches["gap"][1], caches["stock"][1], "logits")
    # One more step over each cache gives the same logits: the cache holds the same keys and values.
    positions, _ = stock.model.get_rope_index(
        batch["input_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
    )
    step = dict(
        input_ids=batch["input_ids"][:, -1:], position_ids=positions.amax(-1, keepdim=True) + 1,
        attention_mask=torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones(3, 1)], dim=1),
    )
    with torch.no_grad():
        ours = model(**step, **{name: caches["gap"][0]}).logits
        theirs = stock(**step, **{name: caches["stock"][0]}).logits
    assert_close_tree(ours, theirs, "next-step logits")


# ---- loading -----------------------------------------------------------------------------------------------------
def test_missing_latent_head_is_initialised_deterministically(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = build_tiny_gap(seed=SEED)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("latent_head.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = [GapQwen2_5VLForConditionalGeneration.from_pretrained(tmp_path) for _ in range(2)]
    head = loaded[0].latent_head
    hidden = model.config.text_config.hidden_size
    assert torch.equal(head.pca_mean, torch.zeros(hidden))
    assert torch.equal(head.pca_components, torch.eye(hidden, head.rank))
    assert torch.equal(head.pca_scale, torch.ones(head.rank))
    assert float(head.ema_norm) == 0.0
    assert torch.equal(head.norm.weight, torch.ones(hidden))
    assert torch.isfinite(head.proj.weight).all() and head.proj.weight.abs().max() < 10
    for buffer in ("pca_mean", "pca_components", "pca_scale", "ema_norm"):
        assert torch.equal(getattr(loaded[0].latent_head, buffer), getattr(loaded[1].latent_head, buffer))
    for name, tensor in head.state_dict().items():
        assert torch.isfinite(tensor).all(), name


def test_can_init_all_missing_weights():
    """transformers' `test_can_init_all_missing_weights`, for the GAP class: with the seed set before each module's
    initialisation, a model built from its config equals one loaded with every weight missing (built on the meta
    device, then initialised by `_init_weights`), tensor for tensor, the latent head included."""
    import copy

    from transformers import PreTrainedModel, set_seed

    config = build_tiny_gap(seed=SEED)[0].config
    original = PreTrainedModel._initialize_weights

    def seeded(self, module, *args, **kwargs):
        set_seed(0)
        return original(self, module, *args, **kwargs)

    try:
        PreTrainedModel._initialize_weights = seeded
        from_config = GapQwen2_5VLForConditionalGeneration(copy.deepcopy(config))
        from_nothing = GapQwen2_5VLForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    finally:
        PreTrainedModel._initialize_weights = original
    assert not [name for name, p in from_nothing.named_parameters() if p.device.type == "meta"]
    ours, theirs = from_config.state_dict(), from_nothing.state_dict()
    assert list(ours) == list(theirs)
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []
    # With one plain `torch.manual_seed` before each (no per-module seeding), the latent head still agrees.
    torch.manual_seed(3)
    plain = GapQwen2_5VLForConditionalGeneration(copy.deepcopy(config)).latent_head.state_dict()
    torch.manual_seed(3)
    meta = GapQwen2_5VLForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    assert all(torch.equal(plain[k], v) for k, v in meta.latent_head.state_dict().items())
    torch.manual_seed(4)
    other = GapQwen2_5VLForConditionalGeneration(copy.deepcopy(config)).latent_head.proj.weight
    assert not torch.equal(other, plain["proj.weight"])  # the seed still matters


def test_loading_a_stock_checkpoint_into_the_gap_class_says_what_to_do(tmp_path):
    stock, tokenizer, _ = build_tiny_qwen2_5_vl(seed=SEED)
    stock.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_qwen2_5_vl"):
        GapQwen2_5VLForConditionalGeneration.from_pretrained(tmp_path)
    # the stock class still loads it, and GAP checkpoints load into the GAP class
    assert isinstance(Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path), Qwen2_5_VLForConditionalGeneration)


# ---- the compiled static step never recompiles --------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3])
def test_compiled_step_compiles_once(pair, batch_size):
    _, model, processor, name = pair
    if name != "gap-pca-k4":
        pytest.skip("one configuration is enough for the compiled step")
    batch = make_batch(processor, batch_size, with_image=True)
    prompt = batch["input_ids"].shape[1]
    force = LogitsProcessorList([ForceTokenAt(model.config.latent_start_token_id, 2, prompt)])
    graphs = []

    def counting_backend(graph_module, example_inputs, **options):
        graphs.append(graph_module)
        return graph_module.forward

    options = dict(cache_implementation="static", compile_config=CompileConfig(backend=counting_backend, fullgraph=True),
                   logits_processor=force, max_latent_spans=1, max_new_tokens=10)
    torch._dynamo.reset()
    first = run_generate(model, batch, **options, return_latents=True)  # text -> latent -> text
    assert first.latents[0].shape[0] == 1
    assert len(graphs) == 1, f"the decode step compiled {len(graphs)} graphs at batch {batch_size}"
    with torch.compiler.set_stance("fail_on_recompile"):
        again = run_generate(model, batch, **options, return_latents=True)
    assert torch.equal(again.sequences, first.sequences)
