"""Serving benchmark: stock vLLM vs the GAP vLLM plugin vs GAP `generate` (not a timed test).

    .venv/bin/python benchmarks/vllm_serving.py [--new-tokens 128] [--threads 2] [--out outputs/vllm_serving.json]

Runs with the main environment (`make install`): it builds tiny (text width 128, 2 layers) and mid-size (width 512,
8 layers) random checkpoints, times GAP `generate` there, and runs the vLLM measurements with `.venv-vllm`
(`make install-vllm`) in a subprocess (`--vllm-worker`). Every run decodes `--new-tokens` tokens per row
(ignore_eos), greedy, with a span of K = 8 latents opened every 32 positions (a logits processor forces
`<|latent_start|>`; the span rule then forces the K slots and the end token). Rows measured:

- `stock, Transformers backend (a)`: the same text weights served through vLLM's Transformers modeling backend
  (`model_impl="transformers"`), the backend the plugin builds on; the same forced token every 32 positions;
- `stock, vLLM native (b)`: vLLM's native Qwen2 decoder on the same text weights, its fastest path for them
  (vLLM's own Qwen2.5-VL module needs torchvision, which does not load here);
- `GAP plugin, no spans`: the plugin with `latent_intervention="drop"` (vLLM's Transformers backend, no latent;
  the forced `<|latent_start|>` opens no span under drop and stays a plain token, as in the stock row);
- `GAP plugin`: the plugin with spans and pca feedback;
- `GAP generate`: `model.generate` (eager DynamicCache) on the same checkpoint and schedule.

The forcing processor runs after the plugin's span processor (vLLM applies `LLM(logits_processors=...)` after
entry-point processors); the plugin's span state follows the tokens actually sampled, so the two compose. `spans`
counts the spans opened (a start followed by a slot), `slots` the `<|latent_pad|>` tokens (the random weights also
sample that token outside spans, where it is a plain token). Every vLLM row runs in vLLM's eager mode and in its
compiled mode (the default: the decoder under torch.compile). Each row is timed `--repeats` times (default 3) and
the fastest run is reported (all are kept in the JSON), in wall-clock tokens/s and in tokens per CPU-second of
the process (engine and worker share it: `VLLM_ENABLE_V1_MULTIPROCESSING=0`), which a shared machine disturbs
less; the vLLM systems of one checkpoint share the process and their runs alternate, so a change of load hits all
of them. `--threads N` pins every system to N threads
(`OMP_NUM_THREADS`, `torch.set_num_threads`, `VLLM_CPU_OMP_THREADS_BIND=0-(N-1)`); the load average is recorded.

On a GPU: `make install-vllm VLLM=vllm==<version> TORCH=torch==<its torch>` then the same command with
`--device cuda` (GAP generate then uses the static cache).
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"tiny": dict(hidden_size=128, num_layers=2), "mid": dict(hidden_size=512, num_layers=8)}
BATCHES = (8, 32)
MODES = ("eager", "compiled")  # vLLM's enforce_eager=True / its default (torch.compile of the decoder)
SPAN_EVERY = 32
K = 8
QUESTIONS = ["Describe the picture.", "What is two plus two?", "Name a colour.", "Count to five, please.",
             "Where is the sign?", "Tell me a story about a cat.", "Why?", "Read the sign aloud."]


# ---- main environment: checkpoints and GAP generate ------------------------------------------------------------
def build_checkpoints(root: Path) -> dict:
    sys.path.insert(0, str(REPO / "gap_vllm" / "tests"))
    from make_fixtures import build_tiny_gap, chat, save_stock_text_model

    paths = {}
    for name, size in SIZES.items():
        model, processor = build_tiny_gap(seed=0, num_latent_tokens=K, latent_feedback="pca", **size)
        gap_dir, stock_dir = root / f"{name}-gap", root / f"{name}-stock-text"
        model.save_pretrained(gap_dir)
        processor.save_pretrained(gap_dir)
        save_stock_text_model(model, processor, stock_dir)
        prompts = [chat(processor, q) for q in QUESTIONS]
        paths[name] = dict(gap=str(gap_dir), stock=str(stock_dir), prompts=prompts,
                           start_id=model.config.latent_start_token_id, pad_id=model.config.latent_pad_token_id)
    return paths


def count_spans(tokens: list, start_id: int, pad_id: int) -> tuple[int, int]:
    """(spans opened: a start followed by a slot, slot tokens) of one generated row."""
    spans = sum(1 for a, b in zip(tokens, tokens[1:]) if a == start_id and b == pad_id)
    return spans, tokens.count(pad_id)


def time_gap_generate(paths: dict, new_tokens: int, device: str, repeats: int) -> list:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from modeling_gap import GapQwen2_5VLForConditionalGeneration, GapQwen2_5VLProcessor

    class SpanEvery(LogitsProcessor):
        def __init__(self, prompt_length, start_id):
            self.prompt_length, self.start_id = prompt_length, start_id

        def __call__(self, input_ids, scores):
            generated = input_ids.shape[1] - self.prompt_length
            if generated and generated % SPAN_EVERY == 0:
                scores[:] = -float("inf")
                scores[:, self.start_id] = 0
            return scores

    rows = []
    for name, info in paths.items():
        model = GapQwen2_5VLForConditionalGeneration.from_pretrained(info["gap"]).to(device).eval()
        processor = GapQwen2_5VLProcessor.from_pretrained(info["gap"])
        processor.tokenizer.padding_side = "left"
        for batch in BATCHES:
            prompts = [info["prompts"][i % len(info["prompts"])] for i in range(batch)]
            inputs = processor(text=prompts, return_tensors="pt", padding=True).to(device)
            options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([SpanEvery(inputs["input_ids"].shape[1],
                                                                           info["start_id"])]))
            if device != "cpu":
                options["cache_implementation"] = "static"
            with torch.no_grad():
                model.generate(**inputs, **{**options, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
                times, cpu_times = [], []
                for _ in range(repeats):
                    start, cpu = time.perf_counter(), time.process_time()
                    out = model.generate(**inputs, **options)
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - cpu)
            generated = out[:, inputs["input_ids"].shape[1]:].tolist()
            counts = [count_spans(t, info["start_id"], info["pad_id"]) for t in generated]
            rows.append(dict(size=name, batch=batch, mode="eager", system="GAP generate",
                             tokens=sum(map(len, generated)),
                             seconds=min(times), all_seconds=times, cpu_seconds=min(cpu_times),
                             all_cpu_seconds=cpu_times, spans=sum(c[0] for c in counts),
                             slots=sum(c[1] for c in counts)))
            print(rows[-1], flush=True)
    return rows


# ---- vLLM environment ------------------------------------------------------------------------------------------
def vllm_worker(paths: dict, new_tokens: int, repeats: int) -> list:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    # Forces <|latent_start|> every SPAN_EVERY generated tokens (both runners' interfaces), in the stock and GAP runs.
    from vllm_serving_gpu import SPAN_EVERY as GPU_SPAN_EVERY, SpanEvery

    assert GPU_SPAN_EVERY == SPAN_EVERY

    import vllm

    rows = []
    # (a) the stock weights through the backend the plugin builds on (vLLM's Transformers backend); (b) vLLM's
    # fastest path for them (its native Qwen2 module). The stock rows are text-only Qwen2 on the GAP model's decoder
    # weights: vLLM's own Qwen2.5-VL module needs torchvision, which does not load here.
    systems = (("stock, Transformers backend (a)", "stock-transformers", None),
               ("stock, vLLM native (b)", "stock", None),
               ("GAP plugin, no spans", "gap", {"latent_intervention": "drop"}),
               ("GAP plugin", "gap", None))
    for name, info in paths.items():
        os.environ["GAP_BENCH_START_ID"] = str(info["start_id"])  # read by SpanEvery when an engine builds it
        for mode in MODES:
            # One engine per system kind, all alive at once so that the systems' runs interleave (round-robin) and
            # share the machine's load; the two GAP rows differ only in their per-request options.
            engines = {kind: LLM(model=info["gap" if kind == "gap" else "stock"], dtype="float32",
                                 max_model_len=1024, max_num_seqs=max(BATCHES), seed=0, enforce_eager=mode == "eager",
                                 enable_prefix_caching=False, block_size=32, kv_cache_memory_bytes=256 << 20,
                                 logits_processors=[SpanEvery],
                                 model_impl="transformers" if kind == "stock-transformers" else "auto")
                       for kind in ("stock-transformers", "stock", "gap")}
            for batch in BATCHES:
                prompts = [info["prompts"][i % len(info["prompts"])] for i in range(batch)]
                times, cpu_times, stats = {s: [] for s, _, _ in systems}, {s: [] for s, _, _ in systems}, {}
                for system, kind, extra in systems:  # warm-up
                    engines[kind].generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                                   extra_args=extra), use_tqdm=False)
                for _ in range(repeats):
                    for system, kind, extra in systems:
                        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True,
                                                extra_args=extra)
                        start, cpu = time.perf_counter(), time.process_time()
                        outs = engines[kind].generate(prompts, params, use_tqdm=False)
                        times[system].append(time.perf_counter() - start)
                        cpu_times[system].append(time.process_time() - cpu)
                        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                        counts = [count_spans(list(o.outputs[0].token_ids), info["start_id"], info["pad_id"])
                                  for o in outs]
                        print(system, mode, batch, name,
                              f"{times[system][-1]:.2f} s, CPU {cpu_times[system][-1]:.2f} s", flush=True)
                        stats[system] = dict(size=name, batch=batch, mode=mode, system=system, tokens=tokens,
                                             spans=sum(c[0] for c in counts), slots=sum(c[1] for c in counts),
                                             vllm=vllm.__version__)
                for system, _, _ in systems:
                    rows.append(dict(stats[system], seconds=min(times[system]), all_seconds=times[system],
                                     cpu_seconds=min(cpu_times[system]), all_cpu_seconds=cpu_times[system]))
            del engines
            gc.collect()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="pin every system to this many threads (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the fastest is reported")
    parser.add_argument("--out", default=str(REPO / "outputs" / "vllm_serving.json"))
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--vllm-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"
        import torch

        torch.set_num_threads(args.threads)
    if args.vllm_worker:
        paths = json.loads(Path(args.vllm_worker).read_text())
        rows = vllm_worker(paths, args.new_tokens, args.repeats)
        Path(args.vllm_worker + ".out").write_text(json.dumps(rows))
        return
    load = [os.getloadavg()]
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_checkpoints(Path(tmp))
        spec = Path(tmp) / "paths.json"
        spec.write_text(json.dumps(paths))
        worker = [args.vllm_python, __file__, "--vllm-worker", str(spec), "--new-tokens", str(args.new_tokens),
                  "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(worker, check=True, env={**os.environ, "PYTHONPATH": ""})
        load.append(os.getloadavg())
        rows = json.loads(Path(str(spec) + ".out").read_text())
        rows += time_gap_generate(paths, args.new_tokens, args.device, args.repeats)
        load.append(os.getloadavg())
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["tokens_per_cpu_s"] = row["tokens"] / row["cpu_seconds"]
    result = dict(rows=rows, machine=dict(platform=platform.platform(), processor=platform.processor(),
                                          cpus=os.cpu_count(), threads=os.environ.get("OMP_NUM_THREADS"),
                                          load_average_start_vllm_end=load),
                  started=started, new_tokens=args.new_tokens, span_every=SPAN_EVERY, k=K, repeats=args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    references = {}
    for row in rows:
        if row["system"].startswith("stock"):
            references[(row["size"], row["batch"], row["mode"], row["system"][-3:])] = row
    print("| size | batch | mode | system | tokens/s | x (a) | x (b) | tokens/CPU-s | spans | slots |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["size"], r["batch"], r["mode"], r["system"])):
        ratios = []
        for ref in ("(a)", "(b)"):
            # GAP generate (eager PyTorch) is compared with vLLM's eager references.
            base = references.get((row["size"], row["batch"], row["mode"], ref))
            ratios.append(row["tokens_per_s"] / base["tokens_per_s"] if base else float("nan"))
        print(f"| {row['size']} | {row['batch']} | {row['mode']} | {row['system']} | {row['tokens_per_s']:.0f} "
              f"| {ratios[0]:.2f} | {ratios[1]:.2f} | {row['tokens_per_cpu_s']:.0f} | {row['spans']} | {row['slots']} |")
    print("load average (1, 5, 15 min) at start / after vLLM / at end:", load)


if __name__ == "__main__":
    main()
