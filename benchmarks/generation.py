"""Positions generated per second: GAP `generate` (with latent spans) against stock transformers `generate`.

Both run on the same weights (the GAP model's stock part is loaded into a stock `Qwen2_5_VLForConditionalGeneration`)
and generate the same number of positions (EOS disabled); GAP opens a span of K latents every `--span-every`
positions (latent slots count as positions). One prompt = text + one image + a question; greedy. Decode time is
time(N new) - time(1 new), best of `--repeats`, after a warm-up; positions/s = batch * (N - 1) / decode time.

    python benchmarks/generation.py                         # tiny and mid-size configs, CPU, batches 1 and 8
    python benchmarks/generation.py --shape 7b --batches 1,32 --new 256 --static   # a GPU

`--static` adds the static-cache paths (stock `cache_implementation="static"`, compiled by transformers, and GAP's
compiled static-cache latent step), when GAP generate supports them.
"""

import argparse
import json
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2_5_VLForConditionalGeneration

from modeling_gap import GapQwen2_5VLProcessor, from_qwen2_5_vl
from trainers.tiny import CHAT_TEMPLATE, tiny_image_processor, tiny_qwen2_5_vl_config, tiny_tokenizer

SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=2, image=56),
    "mid": dict(hidden_size=512, num_layers=8, image=112),
    "7b": dict(hidden_size=3584, num_layers=28, image=448),
}


class OpenSpanEvery(LogitsProcessor):
    """Forces `<|latent_start|>` every `every` positions (from the prompt's end) in every row."""

    def __init__(self, start_id, every, prompt_length):
        self.start_id, self.every, self.prompt_length = start_id, every, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step % self.every == 0:
            scores = torch.full_like(scores, torch.finfo(scores.dtype).min)
            scores[:, self.start_id] = 0
        return scores


def build_models(shape, device, dtype):
    """(GAP model, stock model with the same weights, processor)."""
    tokenizer = tiny_tokenizer()
    if shape == "7b":
        config = tiny_qwen2_5_vl_config(tokenizer, hidden_size=3584, num_layers=28)
        config.text_config.update(dict(vocab_size=152064, intermediate_size=18944, num_attention_heads=28,
                                       num_key_value_heads=4))
        config.text_config.rope_parameters["mrope_section"] = [16, 24, 24]
        config.vision_config.update(dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                         fullatt_block_indexes=[7, 15, 23, 31]))
    else:
        config = tiny_qwen2_5_vl_config(tokenizer, SHAPES[shape]["hidden_size"], SHAPES[shape]["num_layers"])
    torch.manual_seed(0)
    with torch.device(device):
        stock = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    processor = GapQwen2_5VLProcessor(tiny_image_processor(SHAPES[shape]["image"]), tokenizer, CHAT_TEMPLATE)
    gap, processor = from_qwen2_5_vl(stock, processor, num_latent_tokens=8, latent_pca_rank=256)
    return gap.eval(), stock, processor


def make_inputs(processor, batch, image_side, device, dtype):
    from PIL import Image

    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look at the picture below, please."},
                                             {"type": "image"},
                                             {"type": "text", "text": "What is written on the small sign?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (image_side, image_side), (120, 40, 200))
    inputs = processor(images=[image] * batch, text=[text] * batch, padding=True, return_tensors="pt")
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


def copy_bandwidth():
    """Bytes read + written per second by a 2 GiB device-to-device copy (CUDA), the weight-read limit's yardstick."""
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del x, y
    return 2 * 2 * 1024**3 / seconds


def time_generate(model, inputs, new, repeats, sync, **kwargs):
    def run(n):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                 **kwargs)
        sync()
        return time.perf_counter() - start, out

    run(new)  # warm-up (and compilation, for static paths)
    prefill = min(run(1)[0] for _ in range(repeats))
    total, out = min((run(new) for _ in range(repeats)), key=lambda r: r[0])
    assert out.shape[1] == inputs["input_ids"].shape[1] + new, out.shape
    return (total - prefill) / (new - 1), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny,mid", help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new", type=int, default=64, help="positions generated per row")
    parser.add_argument("--span-every", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--static", action="store_true", help="also time the static-cache (compiled) paths")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    results = []
    bandwidth = copy_bandwidth() if device == "cuda" else None
    for shape in args.shape.split(","):
        gap, stock, processor = build_models(shape, device, dtype)
        lm_bytes = sum(p.numel() * p.element_size() for n, p in stock.named_parameters() if "visual" not in n)
        limit_ms = 1e3 * lm_bytes / bandwidth if bandwidth else None
        start_id = gap.config.latent_start_token_id
        for batch in [int(b) for b in args.batches.split(",")]:
            inputs = make_inputs(processor, batch, SHAPES[shape]["image"], device, dtype)
            prompt = inputs["input_ids"].shape[1]
            spans = LogitsProcessorList([OpenSpanEvery(start_id, args.span_every, prompt)])
            paths = [("stock dynamic", stock, {}), ("gap dynamic", gap, {"logits_processor": spans})]
            if args.static:
                paths += [("stock static", stock, {"cache_implementation": "static"}),
                          ("gap static", gap, {"cache_implementation": "static", "logits_processor": spans})]
            row = dict(device=where, shape=shape, batch=batch, new=args.new)
            if limit_ms:
                row["weight-read limit ms/step (batch 1)"] = round(limit_ms, 3)
            for name, model, kwargs in paths:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                step_s, out = time_generate(model, inputs, args.new, args.repeats, sync, **kwargs)
                if device == "cuda":
                    row[f"{name} peak GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if limit_ms and batch == 1:
                    row[f"{name} share of weight-read limit"] = round(limit_ms / (1e3 * step_s), 3)
                if name.startswith("gap"):
                    generated = out[:, prompt:]
                    row["gap_latent_slots"] = int((generated == gap.config.latent_pad_token_id).sum()) // batch
                row[f"{name} ms/step"] = round(1e3 * step_s, 3)
                row[f"{name} positions/s"] = round(batch / step_s, 1)
            row["ratio gap/stock (dynamic)"] = round(row["gap dynamic positions/s"] / row["stock dynamic positions/s"], 3)
            if args.static:
                row["ratio gap static/stock static"] = round(
                    row["gap static positions/s"] / row["stock static positions/s"], 3)
            results.append(row)
            print(json.dumps(row), flush=True)
        del gap, stock
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
