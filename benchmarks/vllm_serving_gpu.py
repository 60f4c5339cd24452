"""Serving check for a GPU machine with vLLM installed: the GAP plugin under vLLM's GPU defaults (not a test).

    pip install vllm -e . -e ./gap_vllm            # or: make install-vllm VLLM=vllm==<version> TORCH=torch==<its>
    python benchmarks/vllm_serving_gpu.py --out outputs/vllm_serving_gpu.json

Builds random checkpoints of Qwen2.5-VL-7B's text shapes (width 3584, 28 layers, 28 heads / 4 KV heads of 128, MLP
18944, vocabulary 152064; a tiny vision tower: no images are sent), bf16, about 50 GB on disk in all: the stock
Qwen2.5-VL checkpoint, the GAP checkpoint converted from it, and the stock text Qwen2 of the same decoder weights,
which vLLM serves through its native Qwen2 module (reference (b), vLLM's fastest path for these weights). Then,
each system in its own process, for batch 1 / 8 / 32, prompts of 64 token ids and
128 new tokens per row (ignore_eos, greedy), a span of K = 8 forced every 32 positions (a logits processor with
both runners' interfaces forces `<|latent_start|>`; the plugin's span rule forces the slots and the end token):

- `stock (b)`: vLLM's defaults (Model Runner V2 where Triton is present, torch.compile, CUDA graphs, async
  scheduling), the same forced token, no latents;
- `stock Qwen2.5-VL, vLLM native` / `..., Transformers backend (a)`: the stock weights through vLLM's own
  Qwen2.5-VL module (it needs torchvision) and through the backend the plugin builds on: which backbone is faster;
- `GAP plugin`: the GAP checkpoint with vLLM's defaults (the plugin turns full CUDA graphs into piecewise ones);
- `GAP plugin, eager`: `enforce_eager=True`, the tokens the defaults must equal.

Each row is timed `--repeats` times after a warm-up and the fastest is reported, in tokens/s, with the runner, the
compilation and CUDA-graph modes and async scheduling as the engine reports them, and whether the plugin's tokens
equal the eager run's (bf16 on random weights: a near-tie can flip a greedy token; the first differing position
of each row is recorded). `--shape tiny --dtype float32 --systems "stock (b)" "GAP plugin" "GAP plugin, eager"` runs on a CPU (the V1 runner, no
torchvision) in a few minutes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "7b": dict(hidden_size=3584, num_layers=28, head_dim=128, vocab_size=152064, intermediate_size=18944,
               num_attention_heads=28, num_key_value_heads=4,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    "tiny": dict(hidden_size=128, num_layers=2, head_dim=64),
}
PROMPT_LENGTH, SPAN_EVERY, K = 64, 32, 8
SYSTEMS = {"stock (b)": dict(kind="stock", eager=False),
           # The backbone question: vLLM's native Qwen2.5-VL module (needs torchvision) against its Transformers
           # backend (what the plugin builds on), both on the stock Qwen2.5-VL weights.
           "stock Qwen2.5-VL, vLLM native": dict(kind="stock-vl", eager=False),
           "stock Qwen2.5-VL, Transformers backend (a)": dict(kind="stock-vl", eager=False, impl="transformers"),
           "GAP plugin": dict(kind="gap", eager=False),
           "GAP plugin, eager": dict(kind="gap", eager=True)}


class SpanEvery(V1LogitsProcessor, V2LogitsProcessor):
    """Force `<|latent_start|>` every SPAN_EVERY generated tokens, on either runner (V1: the output lists;
    V2: each row's position, all prompts being PROMPT_LENGTH long)."""

    def __init__(self, vllm_config, *runner_args):
        self.start_id = int(os.environ["GAP_BENCH_START_ID"])
        self.outputs = {}

    def is_argmax_invariant(self):
        return False

    def update_state(self, batch_update):
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.outputs.pop(index, None)
        for index, _, _, output in batch_update.added:
            self.outputs[index] = output
        for a, b, direction in batch_update.moved:
            if direction.name == "SWAP":
                self.outputs[a], self.outputs[b] = self.outputs.get(b), self.outputs.get(a)
            else:
                self.outputs[b] = self.outputs.pop(a, None)

    def apply(self, logits, ctx=None):
        if ctx is None:
            rows = [i for i, out in self.outputs.items()
                    if out and len(out) % SPAN_EVERY == 0 and i < logits.shape[0]]
            force = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
            force[rows] = True
        else:
            generated = ctx.pos + 1 - PROMPT_LENGTH
            force = (generated > 0) & (generated % SPAN_EVERY == 0)
        start = logits[:, self.start_id].clone()
        logits.masked_fill_(force[:, None], float("-inf"))
        logits[:, self.start_id] = torch.where(force, torch.zeros_like(start), start)
        return logits


def build_checkpoints(root: Path, shape: str, dtype: str) -> dict:
    sys.path.insert(0, str(REPO / "gap_vllm" / "tests"))
    from make_fixtures import save_stock_text_model

    from modeling_gap import GapQwen2_5VLProcessor, from_qwen2_5_vl
    from trainers.tiny import CHAT_TEMPLATE, build_tiny_qwen2_5_vl

    size = dict(SHAPES[shape])
    hidden, layers, head_dim = size.pop("hidden_size"), size.pop("num_layers"), size.pop("head_dim")
    size.setdefault("num_attention_heads", hidden // head_dim)
    size.setdefault("num_key_value_heads", max(hidden // head_dim // 2, 1))
    quarter = head_dim // 16
    size.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model, tokenizer, image_processor = build_tiny_qwen2_5_vl(0, hidden_size=hidden, num_layers=layers,
                                                                  head_dim=head_dim, **size)
        processor = GapQwen2_5VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=CHAT_TEMPLATE)
        stock_vl = root / "stock-vl"
        model.to(getattr(torch, dtype)).save_pretrained(stock_vl)  # before the conversion: the stock checkpoint
        tokenizer.save_pretrained(stock_vl)
        image_processor.save_pretrained(stock_vl)
        model, processor = from_qwen2_5_vl(model, processor, num_latent_tokens=K, latent_feedback="pca")
    model = model.to(getattr(torch, dtype))
    paths = dict(gap=str(root / "gap"), stock=str(root / "stock-text"), **{"stock-vl": str(root / "stock-vl")},
                 start_id=model.config.latent_start_token_id,
                 pad_id=model.config.latent_pad_token_id, vocab=tokenizer.vocab_size)
    model.save_pretrained(paths["gap"])
    processor.save_pretrained(paths["gap"])
    save_stock_text_model(model, processor, paths["stock"])
    return paths


def run_system(paths: dict, system: str, batches: list, new_tokens: int, repeats: int, dtype: str) -> dict:
    """One system in this process (`--system`): timings and tokens per batch."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ["GAP_BENCH_START_ID"] = str(paths["start_id"])
    spec = SYSTEMS[system]
    engine = LLM(model=paths[spec["kind"]], dtype=dtype, max_model_len=1024, max_num_seqs=max(batches), seed=0,
                 enforce_eager=spec["eager"], enable_prefix_caching=False, model_impl=spec.get("impl", "auto"),
                 logits_processors=["vllm_serving_gpu:SpanEvery"],  # by name: the engine runs in another process
                 gpu_memory_utilization=0.8)
    config = engine.llm_engine.vllm_config
    compilation = config.compilation_config
    result = dict(system=system, runner="V2" if getattr(config, "use_v2_model_runner", False) else "V1",
                  compilation=getattr(compilation.mode, "name", str(compilation.mode)),
                  cudagraph_mode=getattr(compilation.cudagraph_mode, "name", str(compilation.cudagraph_mode)),
                  async_scheduling=bool(config.scheduler_config.async_scheduling), rows=[])
    rng = random.Random(0)
    vocab = min(paths["vocab"], 300)  # ordinary token ids of the tiny tokenizer (no special or latent tokens)
    for batch in batches:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab) for _ in range(PROMPT_LENGTH)])
                   for _ in range(batch)]
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False),
                        use_tqdm=False)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            outs = engine.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        result["rows"].append(dict(batch=batch, seconds=min(times), all_seconds=times, tokens=tokens,
                                   tokens_per_s=sum(map(len, tokens)) / min(times),
                                   spans=sum(t.count(paths["start_id"]) for t in tokens),
                                   slots=sum(t.count(paths["pad_id"]) for t in tokens)))
        print(system, batch, f"{result['rows'][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "outputs" / "vllm_serving_gpu.json"))
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS),
                        help="which rows to run (the stock Qwen2.5-VL rows need torchvision)")
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        result = run_system(json.loads(Path(args.paths).read_text()), args.system, args.batches, args.new_tokens,
                            args.repeats, args.dtype)
        Path(args.paths + f".{list(SYSTEMS).index(args.system)}.json").write_text(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_checkpoints(Path(tmp), args.shape, args.dtype)
        spec = Path(tmp) / "paths.json"
        spec.write_text(json.dumps(paths))
        results = []
        for index, system in enumerate(SYSTEMS):
            if system not in args.systems:
                continue
            subprocess.run([sys.executable, __file__, "--system", system, "--paths", str(spec), "--dtype", args.dtype,
                            "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--batches",
                            *map(str, args.batches)], check=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"),
                                                                             os.environ.get("PYTHONPATH", "")])})
            results.append(json.loads(Path(f"{spec}.{index}.json").read_text()))
    eager = {row["batch"]: row["tokens"] for r in results if r["system"] == "GAP plugin, eager" for row in r["rows"]}
    stock = {row["batch"]: row["tokens_per_s"] for r in results if r["system"] == "stock (b)" for row in r["rows"]}
    print("| system | runner | compilation | CUDA graphs | async | batch | tokens/s | x (b) | tokens = eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for row in result["rows"]:
            if result["system"].startswith("GAP") and row["batch"] in eager:
                mismatches = [next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
                              for got, ref in zip(row["tokens"], eager[row["batch"]])]
                row["first_difference_vs_eager"] = mismatches
                equal = f"{sum(m is None for m in mismatches)}/{len(mismatches)} rows"
            else:
                equal = "-"
            print(f"| {result['system']} | {result['runner']} | {result['compilation']} | {result['cudagraph_mode']} "
                  f"| {result['async_scheduling']} | {row['batch']} | {row['tokens_per_s']:.0f} "
                  f"| {row['tokens_per_s'] / stock.get(row['batch'], float('nan')):.2f} | {equal} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(shape=args.shape, dtype=args.dtype, results=results), indent=1))


if __name__ == "__main__":
    main()
