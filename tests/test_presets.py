"""Foreign checkpoints (Monet, Mirage, LVR): loaded by preset without touching a weight, run by their span rule."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration

from testing_utils import COLORS, chat, solid_image
from modeling_gap import LATENT_PRESETS, from_qwen2_5_vl
from modeling_gap.transformers_compat import cache_kwargs
from trainers.tiny import build_tiny_qwen2_5_vl
from testing_utils import ForceTokenAtStep


def save_foreign_checkpoint(path, preset, seed=5):
    """A tiny stock Qwen2.5-VL whose tokenizer has that system's tokens, added in that system's order."""
    model, tokenizer, image_processor = build_tiny_qwen2_5_vl(seed=seed)
    tokenizer.add_special_tokens({"additional_special_tokens": LATENT_PRESETS[preset]["added"]},
                                 replace_extra_special_tokens=False)
    assert len(tokenizer) <= model.config.text_config.vocab_size
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return tokenizer


def _prompt(processor, rows=(0,)):
    processor.tokenizer.padding_side = "left"
    return processor(images=[solid_image(COLORS[i]) for i in rows], text=[chat(processor, "Look closer?") for _ in rows],
                     padding=True, return_tensors="pt")


def _spans(tokens, pad, start, end):
    """Lengths of the closed spans in a token list."""
    spans, length, open_span = [], 0, False
    for t in tokens:
        if t == start:
            open_span, length = True, 0
        elif t == pad and open_span:
            length += 1
        elif t == end and open_span:
            spans.append(length)
            open_span = False
        elif open_span:
            raise AssertionError(f"text token {t} inside a span")
    return spans


def _hand_loop_fed_vectors(model, batch, sequence):
    """Replays `sequence` (1, prompt + new) step by step over a KV cache: a slot is fed the final hidden state of the
    step before it (output-as-input), a token its embedding. Returns the vectors fed at the slots."""
    pad = model.config.latent_pad_token_id
    prompt = batch["input_ids"].shape[1]
    positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                              attention_mask=batch["attention_mask"])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.model(**batch, position_ids=positions, use_cache=True, **cache_kwargs(cache))
        hidden = out.last_hidden_state[:, -1]
        position = positions[:, :, -1:]
        fed = []
        for i in range(prompt, sequence.shape[1] - 1):
            token = sequence[:, i]
            if token.item() == pad:
                vector = hidden
                fed.append(vector[0])
            else:
                vector = model.get_input_embeddings()(token)
            position = position + 1
            mask = torch.ones(1, i + 1, dtype=torch.long)
            hidden = model.model.language_model(inputs_embeds=vector[:, None], position_ids=position,
                                                attention_mask=mask, use_cache=True,
                                                **cache_kwargs(cache)).last_hidden_state[:, -1]
    return torch.stack(fed) if fed else torch.zeros(0)


@pytest.mark.parametrize("preset,k", [("monet", 10), ("lvr", 4)])
def test_fixed_length_presets(tmp_path, preset, k):
    tokenizer = save_foreign_checkpoint(tmp_path / preset, preset)
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / preset)
    options = {"num_latent_tokens": k} if preset == "lvr" else {}
    model, processor = from_qwen2_5_vl(str(tmp_path / preset), preset=preset, latent_feedback="raw", **options)
    spec = LATENT_PRESETS[preset]
    expected_ids = tuple(tokenizer.convert_tokens_to_ids(spec[f"latent_{n}_token"]) for n in ("pad", "start", "end"))
    assert model.config.latent_token_ids == processor.latent_token_ids == expected_ids
    assert len(processor.tokenizer) == len(tokenizer)  # nothing added: the checkpoint already had the tokens
    assert model.config.num_latent_tokens == k and model.config.latent_span_rule == "fixed"
    for name, tensor in stock.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    pad, start, end = expected_ids
    batch = _prompt(processor)
    force = [ForceTokenAtStep(start, {0: {1, k + 4}}, batch["input_ids"].shape[1])]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2 * k + 8, do_sample=False, logits_processor=force,
                             return_latents=True)
    tokens = out.sequences[0, batch["input_ids"].shape[1]:].tolist()
    assert _spans(tokens, pad, start, end) == [k, k]
    fed = out.latents[0].reshape(-1, model.config.text_config.hidden_size)
    reference = _hand_loop_fed_vectors(model, dict(batch), out.sequences)
    assert fed.shape == reference.shape
    assert (fed - reference).abs().max() < 1e-5


def test_mirage_sampled_end(tmp_path):
    save_foreign_checkpoint(tmp_path / "mirage", "mirage")
    model, processor = from_qwen2_5_vl(str(tmp_path / "mirage"), preset="mirage", latent_feedback="raw")
    assert model.config.latent_span_rule == "sampled_end" and model.config.max_latents_per_span == 8
    pad, start, end = model.config.latent_token_ids
    batch = _prompt(processor)
    prompt = batch["input_ids"].shape[1]
    # The model chooses the end token 3 steps after the start: the span ends there, with 2 latents.
    choose_end = [ForceTokenAtStep(start, {0: 1}, prompt), ForceTokenAtStep(end, {0: 4}, prompt)]
    # The end token never chosen: it is forced after 8 latents.
    never_end = [ForceTokenAtStep(start, {0: 1}, prompt)]
    with torch.no_grad():
        short = model.generate(**batch, max_new_tokens=12, do_sample=False, logits_processor=choose_end,
                               return_latents=True, max_latent_spans=1)
        capped = model.generate(**batch, max_new_tokens=16, do_sample=False, logits_processor=never_end,
                                suppress_tokens=[end], return_latents=True, max_latent_spans=1)
    assert _spans(short.sequences[0, prompt:].tolist(), pad, start, end) == [2]
    assert _spans(capped.sequences[0, prompt:].tolist(), pad, start, end) == [8]
    assert short.latents[0].shape == (1, 8, model.config.text_config.hidden_size)
    assert torch.equal(short.latents[0][0, 2:], torch.zeros(6, model.config.text_config.hidden_size))
    reference = _hand_loop_fed_vectors(model, dict(batch), capped.sequences)
    assert (capped.latents[0][0] - reference).abs().max() < 1e-5


def test_ema_norm_feedback_has_the_buffer_norm(tmp_path):
    save_foreign_checkpoint(tmp_path / "monet", "monet")
    model, processor = from_qwen2_5_vl(str(tmp_path / "monet"), preset="monet", latent_feedback="ema_norm")
    assert float(model.latent_head.ema_norm) == 0  # not calibrated: generate calibrates on the prompt's images
    batch = _prompt(processor, rows=(0, 1))
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=14, do_sample=False, return_latents=True,
                             sequence_bias={(model.config.latent_start_token_id,): 100.0}, max_latent_spans=1)
    m = float(model.latent_head.ema_norm)
    assert m > 0
    for row in out.latents:
        assert row.shape[0] == 1
        assert torch.allclose(row.norm(dim=-1), torch.full(row.shape[:2], m), rtol=1e-5)
    # A raw run of the same checkpoint feeds states of a different norm: the calibration really rescales.
    with torch.no_grad():
        raw = model.generate(**batch, max_new_tokens=14, do_sample=False, return_latents=True,
                             sequence_bias={(model.config.latent_start_token_id,): 100.0}, max_latent_spans=1,
                             latent_feedback="raw")
    assert not torch.allclose(raw.latents[0].norm(dim=-1), torch.full((1, 10), m), rtol=1e-2)


RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
results = {}
for path in sys.argv[1:]:
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    batch = torch.load(path + "/batch.pt", weights_only=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False, max_latent_spans=1,
                             sequence_bias={(model.config.latent_start_token_id,): 100.0})
    results[path] = dict(tokens=out.tolist(), module=type(model).__module__, preset=model.config.latent_preset,
                         processor_start=processor.latent_start_token)
print(json.dumps(results))
"""


def test_converted_checkpoints_reload_with_remote_code(tmp_path):
    expected = {}
    for preset in ("monet", "mirage", "lvr"):
        save_foreign_checkpoint(tmp_path / f"stock-{preset}", preset)
        model, processor = from_qwen2_5_vl(str(tmp_path / f"stock-{preset}"), preset=preset, latent_feedback="raw")
        out_dir = str(tmp_path / f"gap-{preset}")
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        batch = dict(_prompt(processor))
        torch.save(batch, out_dir + "/batch.pt")
        with torch.no_grad():
            expected[out_dir] = model.generate(**batch, max_new_tokens=16, do_sample=False, max_latent_spans=1,
                                               sequence_bias={(model.config.latent_start_token_id,): 100.0}).tolist()
        assert model.config.latent_start_token_id in expected[out_dir][0]
    result = subprocess.run([sys.executable, "-c", RELOAD, *expected], capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=300, env={"HF_HOME": str(tmp_path / "hf"), "PATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for path, tokens in expected.items():
        preset = path.rsplit("-", 1)[1]
        assert loaded[path]["module"].startswith("transformers_modules")
        assert loaded[path]["preset"] == preset
        assert loaded[path]["processor_start"] == LATENT_PRESETS[preset]["latent_start_token"]
        assert loaded[path]["tokens"] == tokens
