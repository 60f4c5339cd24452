"""Host time per step of the vLLM plugin's own hooks (a profile, not a timed test).

    .venv-vllm/bin/python benchmarks/vllm_host_time.py [--eager] [--plugin-src DIR]

Serves the benchmark's tiny GAP checkpoint (`benchmarks/vllm_serving.py`) in one process, 32 prompts ending in
`<|latent_start|>` (a span at once), 128 new tokens (ignore_eos, greedy), and reports the plugin's hooks' cumulative
time per step under cProfile (which inflates Python-heavy code): the feed before the forward, the record, the span
processor. `--plugin-src` profiles another copy of the plugin (e.g. an earlier commit's:
`git archive <commit> gap_vllm/src | tar -x -C /tmp/old` then `--plugin-src /tmp/old/gap_vllm/src`); both
designs' hook names are looked for.
"""

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOKS = [("model.py", "feed"), ("model.py", "_rows"), ("model.py", "_feed"), ("model.py", "_record"),
         ("model.py", "record"), ("spans.py", "update_state"), ("spans.py", "apply"), ("spans.py", "hold_record"),
         ("model.py", "embed_input_ids")]
# The hooks vLLM calls (not nested in one another), by design: the device-side one (feed, which records the previous
# step's rows too; the span processor; holding the sampled rows in compute_logits) and the earlier host-side one.
# `model.py:embed_input_ids` (the plugin's text-only embedding, replacing vLLM's multimodal path) is reported apart.
OUTER = {"device": ("model.py:feed", "spans.py:update_state", "spans.py:apply", "spans.py:hold_record"),
         "host": ("model.py:_rows", "model.py:_feed", "model.py:_record", "spans.py:update_state", "spans.py:apply")}
STEPS = 128


def profile(checkpoint: str, prompts: list, pad_id: int, eager: bool) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    import gap_vllm

    llm = LLM(model=checkpoint, dtype="float32", max_model_len=1024, max_num_seqs=32, seed=0, enforce_eager=eager,
              enable_prefix_caching=False, block_size=32, kv_cache_memory_bytes=256 << 20)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    prompts = [p + "<|latent_start|>" for p in prompts]
    llm.generate(prompts, params, use_tqdm=False)
    profiler = cProfile.Profile()
    profiler.enable()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    profiler.disable()
    per_step = {}
    for (file, _, name), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if "gap_vllm" in file and (Path(file).name, name) in HOOKS:
            per_step[f"{Path(file).name}:{name}"] = round(cumulative / STEPS * 1000, 3)
    design = "device" if "model.py:feed" in per_step else "host"
    total = sum(per_step.get(name, 0.0) for name in OUTER[design])
    return dict(plugin=gap_vllm.__file__, design=design, eager=eager, wall_seconds=round(wall, 3), per_step_ms=per_step,
                hooks_ms_per_step=round(total, 3),
                slots=sum(list(o.outputs[0].token_ids).count(pad_id) for o in outs))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eager", action="store_true", help="vLLM's eager mode (default: its compiled mode)")
    parser.add_argument("--plugin-src", help="profile the plugin found here instead of the installed one")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        info = json.loads(Path(args.worker).read_text())
        print("RESULT", json.dumps(profile(info["gap"], info["prompts"] * 4, info["pad_id"], args.eager)))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    import vllm_serving

    vllm_serving.SIZES = {"tiny": vllm_serving.SIZES["tiny"]}
    with tempfile.TemporaryDirectory() as tmp:
        paths = vllm_serving.build_checkpoints(Path(tmp))
        spec = Path(tmp) / "tiny.json"
        spec.write_text(json.dumps(paths["tiny"]))
        env = {**os.environ, "PYTHONPATH": args.plugin_src or ""}
        command = [sys.executable, __file__, "--worker", str(spec)] + (["--eager"] if args.eager else [])
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    print(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


if __name__ == "__main__":
    main()
