"""Build the tiny GAP checkpoint and the reference tokens of GAP `generate` that the vLLM tests compare against.

Runs in a fresh process with the package (`.venv-vllm/bin/python gap_vllm/tests/make_fixtures.py OUT_DIR`: the
package and vLLM share that environment). Writes OUT_DIR/checkpoint (as `save_pretrained`
writes it: config with remote code, safetensors with the latent head, processor files), OUT_DIR/image.png and
OUT_DIR/references.json.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image

try:  # the tiny builder moves from modeling_gap/ to trainers/ (issue 13)
    from trainers.tiny import CHAT_TEMPLATE, build_tiny_qwen2_5_vl
except ImportError:
    from modeling_gap.tiny import CHAT_TEMPLATE, build_tiny_qwen2_5_vl
from modeling_gap import GapQwen2_5VLProcessor, fit_latent_head_pca, from_qwen2_5_vl

MAX_NEW_TOKENS = 40
PROMPTS = [
    "Describe the picture.",
    "What is two plus two?",
    "Name a colour.",
    "Count to five, please.",
    "Where is the sign?",
    "Tell me a story about a cat.",
    "Why?",
]


def build_tiny_gap(seed=0, hidden_size=128, num_layers=2, head_dim=64, **gap_options):
    """A tiny random GAP model whose heads vLLM's CPU attention supports (head_dim 64; the main package's tiny
    builder uses 16), converted by `from_qwen2_5_vl`."""
    heads = hidden_size // head_dim
    quarter = head_dim // 16  # M-RoPE sections summing to head_dim / 2, in the 2:3:3 proportion of Qwen
    model, tokenizer, image_processor = build_tiny_qwen2_5_vl(
        seed, hidden_size=hidden_size, num_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1), head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]},
    )
    processor = GapQwen2_5VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed + 1)
    gap_options.setdefault("latent_pca_rank", 16)
    return from_qwen2_5_vl(model, processor, **gap_options)


def save_stock_text_model(model, processor, out_dir):
    """The GAP model's decoder as a stock text-only Qwen2 checkpoint (a model vLLM serves natively, no GAP): the
    non-GAP control of the serving tests and benchmark. Returns the Qwen2 model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = model.config.text_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "rope_parameters", "dtype"):
        text.pop(key, None)
    config = Qwen2Config(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         tie_word_embeddings=False)
    stock = Qwen2ForCausalLM(config)
    state = {k.replace("model.language_model.", "model."): v for k, v in model.state_dict().items()
             if k.startswith("model.language_model.") or k.startswith("lm_head.")}
    stock.load_state_dict(state, strict=True)
    stock.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    return stock.float().eval()


def chat(processor, text, image=False):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def generate(model, processor, prompts, image=None, **options):
    """Greedy GAP generate, one row at a time (no padding): the generated ids of each prompt."""
    outputs = []
    for prompt in prompts:
        inputs = processor(images=[image] if image is not None else None, text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **options)
        outputs.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    return outputs


def first_span(tokens, start_id):
    return tokens.index(start_id) if start_id in tokens else None


def stray_pads(tokens, ids, k):
    """Positions of `<|latent_pad|>` tokens outside a span (fixed rule: start, K slots, end)."""
    pad_id, start_id, _ = ids
    stray, slots = [], 0
    for i, t in enumerate(tokens):
        if slots:
            slots -= 1
        elif t == start_id:
            slots = k
        elif t == pad_id:
            stray.append(i)
    return stray


class PadBias:
    """A logits processor adding `bias` to `<|latent_pad|>` (vLLM: `SamplingParams(logit_bias=...)`)."""

    def __init__(self, pad_id, bias):
        self.pad_id, self.bias = pad_id, bias

    def __call__(self, input_ids, scores):
        scores[:, self.pad_id] += self.bias
        return scores


def main(out_dir):
    torch.manual_seed(0)
    model, processor = build_tiny_gap(seed=3, num_latent_tokens=4, latent_feedback="pca")
    model = model.float().eval()
    pad_id, start_id, end_id = model.config.latent_token_ids
    rng = np.random.default_rng(0)
    calibration = [Image.fromarray(rng.integers(0, 255, (84, 84, 3), dtype=np.uint8)) for _ in range(6)]
    fit_latent_head_pca(model, calibration, image_processor=processor.image_processor)
    prompts = [chat(processor, p) for p in PROMPTS]

    # A random model rarely picks <|latent_start|>: give it the output row of a token it often picks (scaled), so
    # that spans open at data-dependent steps; do the same for <|latent_end|> (the sampled_end rule can end early).
    lm_head = model.lm_head.weight
    base = generate(model, processor, prompts, latent_intervention="drop")
    counts = {}
    for tokens in base:
        for t in set(tokens):
            counts[t] = counts.get(t, 0) + 1
    chosen = None
    for token in sorted(counts, key=lambda t: -counts[t]):
        if counts[token] >= len(prompts) or token in (pad_id, start_id, end_id):
            continue
        with torch.no_grad():
            saved = lm_head[start_id].clone()
            lm_head[start_id] = 1.05 * lm_head[token]
        trial = generate(model, processor, prompts)
        steps = [first_span(t, start_id) for t in trial]
        opened = [s for s in steps if s is not None]
        if len(set(opened)) >= 3 and len(opened) < len(prompts):
            chosen = token
            break
        with torch.no_grad():
            lm_head[start_id] = saved
    if chosen is None:
        raise SystemExit("no token gives spans at different steps; change the seed")
    with torch.no_grad():  # <|latent_end|> competes with a common token
        others = [t for t in sorted(counts, key=lambda t: -counts[t]) if t not in (chosen, pad_id, start_id, end_id)]
        lm_head[end_id] = 1.02 * lm_head[others[0]]

    checkpoint = os.path.join(out_dir, "checkpoint")
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    image = Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))
    image.save(os.path.join(out_dir, "image.png"))
    image = Image.open(os.path.join(out_dir, "image.png")).convert("RGB")

    refs = {"prompts": prompts, "ids": {"pad": pad_id, "start": start_id, "end": end_id},
            "max_new_tokens": MAX_NEW_TOKENS, "cases": {}}
    cases = refs["cases"]
    for feedback in ("pca", "raw", "ema_norm"):
        cases[f"batch_{feedback}"] = generate(model, processor, prompts, latent_feedback=feedback)
        cases[f"ends_in_start_{feedback}"] = generate(
            model, processor, [prompts[1] + "<|latent_start|>"], latent_feedback=feedback)[0]
    cases["zero"] = generate(model, processor, prompts, latent_intervention="zero")
    cases["drop"] = generate(model, processor, prompts, latent_intervention="drop")
    cases["max_spans_1"] = generate(model, processor, prompts, max_latent_spans=1)
    for question in ("What is in the image?", "Describe it.", "Where is the sign?", "Count the shapes.",
                     "What colour is it?", "Read the text.", "Is it big?"):
        image_prompt = chat(processor, question, image=True)
        cases["image"] = generate(model, processor, [image_prompt], image=image)[0]
        if start_id in cases["image"]:
            break
    refs["image_prompt"] = image_prompt
    cases["image_zero"] = generate(model, processor, [image_prompt], image=image, latent_intervention="zero")[0]
    # A model may sample <|latent_pad|> outside a span (a plain token, fed its token embedding): bias it until
    # several rows do, one of them with spans too, while some rows have none.
    from transformers import LogitsProcessorList

    for bias in (0.2, 0.25, 0.3, 0.35):
        trial = generate(model, processor, prompts, logits_processor=LogitsProcessorList([PadBias(pad_id, bias)]))
        stray = [stray_pads(t, (pad_id, start_id, end_id), 4) for t in trial]
        if sum(map(bool, stray)) >= 2 and not all(stray) and any(s and start_id in t for s, t in zip(stray, trial)):
            refs["pad_bias"], cases["stray_pad"] = bias, trial
            break
    else:
        raise SystemExit("no <|latent_pad|> bias gives slot tokens outside spans; change the seed")
    # A model that is not a GAP checkpoint, served with the plugin installed: its greedy tokens under transformers.
    stock = save_stock_text_model(model, processor, os.path.join(out_dir, "stock-text"))
    cases["stock_text"] = []
    for prompt in prompts:
        ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = stock.generate(input_ids=ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        cases["stock_text"].append(out[0, ids.shape[1]:].tolist())
    model.config.latent_span_rule, model.config.latent_max_tokens = "sampled_end", 6
    cases["sampled_end"] = generate(model, processor, prompts)
    model.config.latent_span_rule, model.config.latent_max_tokens = "fixed", None
    with open(os.path.join(out_dir, "references.json"), "w") as f:
        json.dump(refs, f)
    steps = [first_span(t, start_id) for t in cases["batch_pca"]]
    print(json.dumps({"first_span_steps": steps, "start_row_from": chosen}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
