"""A/B of two copies of the vLLM plugin on one checkpoint size, batch and mode (a profile, not a timed test).

    .venv-vllm/bin/python benchmarks/vllm_plugin_ab.py --plugin-src /tmp/old/gap_vllm/src [--rounds 2]

The ratios of `benchmarks/vllm_serving.py` move by up to a tenth between runs on a shared machine, more than a
change to the plugin moves them. This compares two plugins directly: `--plugin-src` is the other copy (e.g. an
earlier commit's: `git archive <commit> gap_vllm/src | tar -x -C /tmp/old`), the installed one is "current". Each
round starts one process per plugin, alternating, each serving the benchmark's GAP checkpoint (`--size`, default
tiny) and reference (a) (the same weights as text Qwen2 through vLLM's Transformers backend) in one engine each,
`--batch` prompts, 128 new tokens (ignore_eos, greedy, a span forced every 32 positions), best of `--repeats`
runs alternating the two engines. Prints ms per step and plugin / (a) for every process.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 128


def worker(info: dict, batch: int, eager: bool, repeats: int) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm_serving_gpu import SpanEvery

    import gap_vllm

    os.environ["GAP_BENCH_START_ID"] = str(info["start_id"])
    engines = {kind: LLM(model=info["gap" if kind == "plugin" else "stock"], dtype="float32", max_model_len=1024,
                         max_num_seqs=32, seed=0, enforce_eager=eager, enable_prefix_caching=False, block_size=32,
                         kv_cache_memory_bytes=256 << 20, logits_processors=[SpanEvery],
                         model_impl="transformers" if kind == "(a)" else "auto")
               for kind in ("(a)", "plugin")}
    prompts = [info["prompts"][i % len(info["prompts"])] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    for engine in engines.values():
        engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    times = {kind: [] for kind in engines}
    for _ in range(repeats):
        for kind, engine in engines.items():
            start = time.perf_counter()
            engine.generate(prompts, params, use_tqdm=False)
            times[kind].append(time.perf_counter() - start)
    ms = {kind: min(t) / STEPS * 1000 for kind, t in times.items()}
    return dict(plugin_src=str(Path(gap_vllm.__file__).parent), ms_per_step=ms, plugin_over_a=ms["(a)"] / ms["plugin"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin-src", required=True, help="the other plugin's source folder (holds gap_vllm/)")
    parser.add_argument("--size", default="tiny", choices=("tiny", "mid"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eager", action="store_true", help="vLLM's eager mode (default: its compiled mode)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        sys.path.insert(0, str(REPO / "benchmarks"))
        result = worker(json.loads(Path(args.worker).read_text()), args.batch, args.eager, args.repeats)
        print("RESULT", json.dumps(result))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    import vllm_serving

    vllm_serving.SIZES = {args.size: vllm_serving.SIZES[args.size]}
    with tempfile.TemporaryDirectory() as tmp:
        paths = vllm_serving.build_checkpoints(Path(tmp))
        spec = Path(tmp) / "checkpoint.json"
        spec.write_text(json.dumps(paths[args.size]))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}"}
        command = [sys.executable, __file__, "--worker", str(spec), "--plugin-src", args.plugin_src, "--batch",
                   str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        command += ["--eager"] if args.eager else []
        for _ in range(args.rounds):
            for name, pythonpath in (("other", args.plugin_src), ("current", "")):
                out = subprocess.run(command, env={**env, "PYTHONPATH": pythonpath}, check=True,
                                     capture_output=True, text=True).stdout
                result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
                ms = result["ms_per_step"]
                print(f"{name:8s} {result['plugin_src']}: plugin {ms['plugin']:.2f} ms/step, (a) {ms['(a)']:.2f} "
                      f"ms/step, plugin / (a) {result['plugin_over_a']:.2f}", flush=True)


if __name__ == "__main__":
    main()
