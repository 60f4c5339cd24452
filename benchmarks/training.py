"""Time per optimizer step and peak memory: `GapSFTTrainer` (batches with latent spans) against TRL's stock
`SFTTrainer` on the same batches without spans.

Same model (a tiny or mid-size random GAP model, vision tower frozen in both), same rows, same sequence lengths: in
the stock rows each `<|latent|>` marker is replaced by plain text of the same token count (K + 2) and the aux image
is dropped (checked: the batches have the same length). Both trainers use TRL's defaults otherwise (gradient
checkpointing on, AdamW, fp32 on CPU). GAP's extra work per step: the aux images' preprocessing in the collator and
their pass through the (frozen) vision tower, the latent head and its loss.

Each (shape, trainer) runs in a fresh subprocess, `--repeats` times, alternating GAP and stock:
- step time: median wall time between consecutive optimizer steps (`on_step_end`), after `--warmup` steps; it
  includes fetching and collating the batch. The best median over the repeats is reported.
- peak memory: peak resident set size (RSS, sampled every millisecond from /proc/self/statm) during `train()` minus
  the RSS just before it (CPU; the largest over the repeats is reported). tracemalloc would miss torch's tensors.

    python benchmarks/training.py                       # tiny and mid-size (hidden 512, 8 layers), CPU
    python benchmarks/training.py --shapes mid --steps 30 --repeats 3

Goals: GAP / stock <= 1.10x time and <= 1.05x memory.

`--compare padding`: `GapSFTTrainer` with padded batches against `padding_free=True` (the batch's rows concatenated
without padding), on rows of mixed lengths (each assistant answer gets 0-400 characters of extra text, one token per
character with the tiny tokenizer; spans and aux images as in the synthetic task). Reported: trained tokens (real,
not padding) per second over the timed steps, and the padded batch's share of padding.

    python benchmarks/training.py --compare padding --shapes tiny,mid --threads 1
    # GPU, a 7B-shaped GAP model (Qwen2.5-VL-7B's text widths, random weights, tiny vocabulary and vision tower),
    # bf16, flash-attention's variable-length kernels for the padding-free rows (needs flash-attn installed):
    python benchmarks/training.py --compare padding --shapes 7b --device cuda --attn flash_attention_2 --batch 8 \
        --steps 10 --repeats 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=2, image_size=56),
    "mid": dict(hidden_size=512, num_layers=8, image_size=112),
    # Qwen2.5-VL-7B's text model (28 layers, 28 heads of 128, 4 KV heads); GPU only (`--compare padding`).
    "7b": dict(hidden_size=3584, num_layers=28, image_size=112, text=dict(
        num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})),
}


class RSSSampler(threading.Thread):
    """Samples this process's resident set size every `interval` seconds; `peak` in bytes."""

    def __init__(self, interval=0.001):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, 0, True
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def stop(self):
        self.running = False
        self.join()
        self.peak = max(self.peak, self.rss())


def worker(args):
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from modeling_gap import fit_latent_head_pca
    from trainers.tiny import build_tiny_gap
    from trainers import GapDataCollator, GapSFTConfig, GapSFTTrainer, make_synthetic_dataset

    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    model, processor = build_tiny_gap(seed=0, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"])
    processor.tokenizer.eos_token = "<|im_end|>"
    rows = args.batch * (args.steps + args.warmup + 1)
    dataset = make_synthetic_dataset(rows, seed=0, image_size=shape["image_size"], aux_size=56)
    images = [image for row in dataset.select(range(16)) for image in row["images"] + row["aux_images"]]
    fit_latent_head_pca(model, images, image_processor=processor.image_processor)
    model.model.visual.requires_grad_(False)  # GAP's default; the same for the stock run

    gap_collator = GapDataCollator(processor, max_length=1024)
    # Stock rows: each <|latent|> marker (K + 2 tokens once expanded) becomes plain text of K + 2 tokens, and the aux
    # image is dropped: same lengths, no span. The stock collator does no aux-image preprocessing.
    span_tokens = processor.num_latent_tokens + 2
    filler = "x" * span_tokens
    if len(processor.tokenizer.encode(filler, add_special_tokens=False)) != span_tokens:
        raise SystemExit("the filler text does not tokenize to K + 2 tokens with this tokenizer")
    plain_collator = GapDataCollator(processor, max_length=1024, capacity_guided=False)

    def stock_collator(features):
        rows = []
        for row in features:
            messages = [
                {"role": m["role"], "content": [
                    {**part, "text": part["text"].replace(processor.latent_marker, filler)}
                    if part.get("text") else part
                    for part in m["content"]
                ]}
                for m in row["messages"]
            ]
            rows.append({**row, "messages": messages, "aux_images": []})
        return plain_collator(rows)

    first = dataset.select(range(args.batch)).to_list()
    gap_length, stock_length = (c(first)["input_ids"].shape[1] for c in (gap_collator, stock_collator))
    if gap_length != stock_length:
        raise SystemExit(f"GAP and stock batches differ in length ({gap_length} vs {stock_length})")

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="gap-bench-"), use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=10_000, max_steps=args.steps + args.warmup, seed=0,
        per_device_train_batch_size=args.batch, learning_rate=1e-4, disable_tqdm=True, remove_unused_columns=False,
        max_length=1024,
    )
    if args.trainer == "gap":
        trainer = GapSFTTrainer(model, args=GapSFTConfig(**common, validate_dataset=False), train_dataset=dataset,
                                processing_class=processor)
    else:
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=dataset, processing_class=processor,
                             data_collator=stock_collator)

    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer.add_callback(Clock())
    sampler = RSSSampler()
    base = sampler.rss()
    sampler.start()
    start = time.perf_counter()
    trainer.train()
    sampler.stop()
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)][args.warmup:]
    print(json.dumps(dict(
        shape=args.shape, trainer=args.trainer, step_s=statistics.median(times), steps=len(times),
        peak_mb=(sampler.peak - base) / 2**20, seq_len=int(gap_length),
    )))


def mixed_length_rows(dataset, seed=0, max_extra_chars=400):
    """The rows with 0..max_extra_chars characters of extra text in front of each answer (seeded): mixed lengths."""
    import random

    rng = random.Random(seed)
    words = "then look at the square and its frame again carefully "

    def lengthen(row):
        extra = (words * (max_extra_chars // len(words) + 1))[: rng.randint(0, max_extra_chars)]
        messages = []
        for message in row["messages"]:
            if message["role"] == "assistant":
                parts = [dict(part) for part in message["content"]]
                text_part = next(part for part in parts if part.get("type") == "text")
                text_part["text"] = extra + text_part["text"]
                message = {**message, "content": parts}
            messages.append(message)
        return {"messages": messages}

    return dataset.map(lengthen)


def padding_worker(args):
    """One run of `--compare padding`: trained tokens per second, padded (`--trainer padded`) or padding-free."""
    import torch
    from transformers import TrainerCallback

    from modeling_gap import GapQwen2_5VLProcessor, fit_latent_head_pca, from_qwen2_5_vl
    from trainers import GapSFTConfig, GapSFTTrainer, make_synthetic_dataset
    from trainers.tiny import CHAT_TEMPLATE, build_tiny_qwen2_5_vl

    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    stock, tokenizer, image_processor = build_tiny_qwen2_5_vl(
        0, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"], **shape.get("text", {}))
    processor = GapQwen2_5VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    model, processor = from_qwen2_5_vl(stock, processor, num_latent_tokens=4, latent_pca_rank=16)
    model.set_attn_implementation(args.attn)
    rows = args.batch * (args.steps + args.warmup + 1)
    dataset = make_synthetic_dataset(rows, seed=0, image_size=shape["image_size"], aux_size=56)
    images = [image for row in dataset.select(range(16)) for image in row["images"] + row["aux_images"]]
    fit_latent_head_pca(model, images, image_processor=processor.image_processor)
    dataset = mixed_length_rows(dataset)
    on_gpu = args.device == "cuda"
    config = GapSFTConfig(
        output_dir=tempfile.mkdtemp(prefix="gap-bench-"), use_cpu=not on_gpu, bf16=on_gpu, report_to="none",
        save_strategy="no", logging_steps=10_000, max_steps=args.steps + args.warmup, seed=0,
        per_device_train_batch_size=args.batch, learning_rate=1e-5, disable_tqdm=True, max_length=None,
        validate_dataset=False, padding_free=args.trainer == "padding_free",
    )
    trainer = GapSFTTrainer(model, args=config, train_dataset=dataset, processing_class=processor)
    lengths = [trainer.data_collator([row])["input_ids"].shape[1] for row in dataset.select(range(4 * args.batch))]
    stamps, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            tokens.append(trainer._total_train_tokens)

    trainer.add_callback(Clock())
    start = time.perf_counter()
    trainer.train()
    seconds = stamps[-1] - stamps[args.warmup - 1] if args.warmup else stamps[-1] - start
    trained = tokens[-1] - (tokens[args.warmup - 1] if args.warmup else 0)
    batches = [lengths[i : i + args.batch] for i in range(0, len(lengths), args.batch)]
    padding_share = sum(len(b) * max(b) - sum(b) for b in batches) / sum(len(b) * max(b) for b in batches)
    print(json.dumps(dict(shape=args.shape, trainer=args.trainer, tokens_per_s=trained / seconds,
                          step_s=seconds / len(stamps[args.warmup:]), mean_len=sum(lengths) / len(lengths),
                          min_len=min(lengths), max_len=max(lengths), padding_share=padding_share)))


def run_one(args, shape, trainer):
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--shape", shape, "--trainer", trainer,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
               "--threads", str(args.threads), "--compare", args.compare, "--device", args.device,
               "--attn", args.attn]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{shape}/{trainer} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,mid", help="comma list of " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--batch", type=int, default=4, help="per-device batch size")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (shape, trainer), alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--compare", default="stock", choices=["stock", "padding"],
                        help="stock: GAP against TRL's stock SFTTrainer; padding: padded against padding-free batches")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--compare padding only")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (--compare padding only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", default="gap", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return padding_worker(args) if args.compare == "padding" else worker(args)
    if args.compare == "padding":
        return compare_padding(args)

    import platform

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"batch {args.batch}, {args.steps} timed steps after {args.warmup}, {args.repeats} repeats")
    print(f"{'shape':6} {'seq':>5} {'GAP s/step':>11} {'stock s/step':>13} {'time x':>7} {'GAP MB':>8} "
          f"{'stock MB':>9} {'memory x':>9}")
    for shape in args.shapes.split(","):
        results = {"gap": [], "stock": []}
        for _ in range(args.repeats):
            for trainer in ("gap", "stock"):
                results[trainer].append(run_one(args, shape, trainer))
        gap_time = min(r["step_s"] for r in results["gap"])
        stock_time = min(r["step_s"] for r in results["stock"])
        gap_memory = max(r["peak_mb"] for r in results["gap"])
        stock_memory = max(r["peak_mb"] for r in results["stock"])
        print(f"{shape:6} {results['gap'][0]['seq_len']:>5} {gap_time:>11.4f} {stock_time:>13.4f} "
              f"{gap_time / stock_time:>6.3f}x {gap_memory:>8.1f} {stock_memory:>9.1f} "
              f"{gap_memory / max(stock_memory, 1e-9):>8.3f}x")
    print("goals: time <= 1.10x, memory <= 1.05x (memory: peak RSS growth during train(), sampled every 1 ms)")


def compare_padding(args):
    import platform

    print(f"{args.device}: {platform.processor() or platform.machine()}, torch threads {args.threads}, attention "
          f"{args.attn}; batch {args.batch}, {args.steps} timed steps after {args.warmup}, best of {args.repeats}")
    print(f"{'shape':6} {'row tokens (min/mean/max)':>26} {'padding':>8} {'padded tok/s':>13} "
          f"{'padding-free tok/s':>19} {'speed-up':>9}")
    for shape in args.shapes.split(","):
        results = {"padded": [], "padding_free": []}
        for _ in range(args.repeats):
            for trainer in results:
                results[trainer].append(run_one(args, shape, trainer))
        padded = max(r["tokens_per_s"] for r in results["padded"])
        free = max(r["tokens_per_s"] for r in results["padding_free"])
        first = results["padded"][0]
        lengths = f"{first['min_len']}/{first['mean_len']:.0f}/{first['max_len']}"
        print(f"{shape:6} {lengths:>26} {first['padding_share']:>7.0%} {padded:>13.0f} {free:>19.0f} "
              f"{free / padded:>8.2f}x")


if __name__ == "__main__":
    main()
