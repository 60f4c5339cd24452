"""The `gap` command: one subcommand per stage, each taking the same YAML (`--config FILE.yaml`) and flags as its
recipe in `recipes/`, parsed by TRL's `TrlParser` into the stage's dataclasses and run by the same library function.

    gap make-tiny --output_dir outputs/tiny-gap
    gap sft --config recipes/tiny/sft/config_pca.yaml
    gap eval --model_name_or_path outputs/tiny-gap-sft --dataset_name outputs/tiny-data --dataset_split test
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml -m trainers.cli sft --config ...

`gap <stage> --help` lists every field of the stage.
"""

import importlib
import os
import sys

# stage -> (module, function, argument dataclasses as "module:Class"); None: the stage parses its own arguments.
STAGES = {
    "convert": ("trainers.dataset_conversion", "convert_dataset", ["trainers.arguments:ConvertDatasetArguments"]),
    "fit-pca": ("trainers.pca_fit", "fit_pca", ["trainers.arguments:FitPCAArguments"]),
    "assign-capacity": ("trainers.capacity", "assign_capacity", ["trainers.arguments:CapacityArguments"]),
    "sft": ("trainers.sft", "train", ["trainers.arguments:GapScriptArguments", "trainers.gap_sft_config:GapSFTConfig",
                                      "trl:ModelConfig"]),
    "eval": ("trainers.evaluation", "run_evaluation", ["trainers.arguments:EvalArguments"]),
    "probe": ("trainers.diagnostics", "run_probe", ["trainers.arguments:EvalArguments"]),
    "diagnose-norms": ("trainers.diagnostics", "run_norm_diagnosis", ["trainers.arguments:EvalArguments"]),
    "probe-latents": ("trainers.latent_probe", "run_latent_probe", ["trainers.latent_probe:LatentProbeArguments"]),
    "latent-lens": ("trainers.diagnostics", "run_latent_lens", ["trainers.arguments:EvalArguments"]),
    "push": ("trainers.hub", "publish", ["trainers.arguments:PushArguments"]),
    "space": ("trainers.space", "run_space", ["trainers.arguments:SpaceArguments"]),
    "make-tiny": ("trainers.tiny", "make_tiny", ["trainers.arguments:MakeTinyArguments"]),
    "make-data": ("trainers.dataset_loader", "make_data", ["trainers.arguments:MakeDataArguments"]),
    "memory-plan": ("trainers.memory_plan", "memory_plan", ["trainers.memory_plan:MemoryPlanArguments"]),
    "demo": ("trainers.demo", "main", None),
    # lmms-eval (trainers/lmms_eval_plugin; installed by `make install`)
    "lmms-eval": ("trainers.lmms_eval_plugin.runner", "main", None),
    "lmms-eval-tasks": ("trainers.lmms_eval_plugin.runner", "write_tasks_main", None),
}
SUMMARIES = {
    "convert": "Monet / Mirage / LVR data -> GAP's dataset schema",
    "fit-pca": "fit the PCA-aligned latent head on calibration images (converts a stock checkpoint)",
    "assign-capacity": "the base model's pass rate per row -> use_latent (capacity-level alignment)",
    "sft": "train with GapSFTTrainer (full, LoRA, QLoRA; accelerate for several processes)",
    "eval": "accuracy by generation over a split, with a 95% interval",
    "probe": "accuracy under each latent intervention (zero, noise, shuffle, mean, drop)",
    "diagnose-norms": "norms where latents are fed (closed loop, teacher-forced, per feedback mode) and per layer",
    "probe-latents": "what the latents carry: a linear probe from each fed latent to a row property",
    "latent-lens": "where each latent looks: similarity to the image's visual tokens",
    "push": "publish a hub_configs/ variant (weights, code, card) in one commit",
    "space": "serve the latent inspector of a checkpoint (gradio; pip install -e '.[space]')",
    "make-tiny": "write a tiny random GAP (or stock Qwen2.5-VL) checkpoint, offline",
    "make-data": "write the offline synthetic task (train / test splits in GAP's schema)",
    "memory-plan": "parameters and memory per GPU of the 7B recipes (full ZeRO-3, LoRA, QLoRA), no download",
    "demo": "the offline end-to-end demo (make demo)",
    "lmms-eval": "run lmms-eval's CLI (model `gap`), failing unless its results file holds every task's result",
    "lmms-eval-tasks": "write lmms-eval task YAMLs over local data (GAP rows; vstar/hrbench/mme-realworld/mathvista)",
}


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: gap <stage> [--config FILE.yaml] [--field value ...]", "", "stages:"]
    lines += [f"  {name:<{width}}  {SUMMARIES[name]}" for name in STAGES]
    lines += ["", "`gap <stage> --help` lists the stage's fields."]
    return "\n".join(lines)


def parse_stage(stage: str, argv: list[str]):
    """The stage's dataclasses parsed from `argv` (YAML `--config` first, flags over it)."""
    from trl import TrlParser

    classes = [_load(spec) for spec in STAGES[stage][2]]
    parser = TrlParser(classes, prog=f"gap {stage}", description=SUMMARIES[stage])
    return parser.parse_args_and_config(argv)


def run_stage(stage: str, argv: list[str] | None = None):
    """Parse `argv` for `stage` and run it; returns what the stage returns."""
    if stage not in STAGES:
        raise SystemExit(f"gap: unknown stage {stage!r}.\n\n{usage()}")
    argv = list(sys.argv[1:] if argv is None else argv)
    module, function, classes = STAGES[stage]
    run = getattr(importlib.import_module(module), function)
    if classes is None:
        return run(argv)
    try:
        parsed = parse_stage(stage, argv)
    except ValueError as error:
        if "support bf16/gpu" in str(error):  # TrainingArguments' words for a bf16 recipe on a machine without GPUs
            raise ValueError(
                "this recipe trains in bf16 on GPUs (bf16: true) and this machine has none: run it on GPUs, or on "
                "CPU pass --use_cpu true --bf16 false (a 7B model will not train on a CPU; the tiny recipes under "
                "recipes/tiny/ do)."
            ) from None
        raise
    try:
        return run(*parsed)
    finally:
        if stage == "sft":
            import torch.distributed

            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()  # a process group left open aborts the process at exit


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    try:
        run_stage(argv[0], argv[1:])
    except (ValueError, KeyError, OSError) as error:
        # Input problems the stage has named: one clear line, not a traceback (from the first process only, when
        # accelerate launched several).
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if os.environ.get("RANK", "0") == "0":
            print(f"gap {argv[0]}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    return None


if __name__ == "__main__":
    main()
