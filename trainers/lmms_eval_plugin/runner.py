"""`gap lmms-eval ...`: lmms-eval's CLI, then a check of what it wrote.

lmms-eval exits 0 when an evaluation fails (it prints the traceback and writes no results), so a script cannot
trust its exit code. This wrapper runs `python -m lmms_eval ARGS` (with `--num_processes N`: under `accelerate
launch --num_processes N` on GPUs, `torchrun --nproc_per_node N` on CPU), then fails unless a results file written
by this run exists under `--output_path` (default `outputs/lmms-eval`) and holds a result for every task asked for,
with no error in it. It prints the file's path.

    gap lmms-eval --model gap --model_args pretrained=ORG/gap-7b --tasks gap_shapes --include_path outputs/lmms-tasks
    gap lmms-eval --num_processes 8 --model gap --model_args pretrained=ORG/gap-7b --tasks vstar_bench

`gap lmms-eval-tasks` writes the `--include_path` folder (`trainers.lmms_eval_plugin.tasks`).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

DEFAULT_OUTPUT_PATH = "outputs/lmms-eval"


class LmmsEvalFailed(ValueError):
    """lmms-eval ran but its results are missing or hold an error."""


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def lmms_eval_command(lmms_args: list[str], num_processes: int = 1) -> list[str]:
    """The command line that runs lmms-eval's CLI with `lmms_args` (one process, or `accelerate launch`)."""
    if num_processes > 1 and torch_cuda_available():
        # lmms-eval's own way on GPUs: one process per GPU, each with its copy of the model
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                "-m", "lmms_eval", *lmms_args]
    if num_processes > 1:
        # without GPUs accelerate's launcher starts one process; torchrun starts N (gloo; --standalone: a free port)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
                "-m", "lmms_eval", *lmms_args]
    return [sys.executable, "-m", "lmms_eval", *lmms_args]


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def find_results(output_path: str, since: float) -> list[str]:
    """The `*_results.json` files under `output_path` (a folder, or a file whose folder is used) written at or after
    `since` (a `time.time()`), newest last."""
    folder = output_path if not os.path.splitext(output_path)[1] else os.path.dirname(output_path) or "."
    files = [f for f in glob.glob(os.path.join(folder, "**", "*_results.json"), recursive=True)
             if os.path.getmtime(f) >= since]
    return sorted(files, key=os.path.getmtime)


def check_results(path: str, tasks: list[str]) -> dict:
    """The results of `path`; `LmmsEvalFailed` naming what is wrong when a task asked for has no result or a result
    holds an error."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise LmmsEvalFailed(f"lmms-eval's results file {path} cannot be read: {error}") from None
    results = report.get("results") or {}
    groups = report.get("group_subtasks") or {}
    if not results:
        raise LmmsEvalFailed(f"lmms-eval's results file {path} holds no results.")
    missing = [t for t in tasks if t not in results and t not in groups]
    if missing:
        raise LmmsEvalFailed(f"lmms-eval's results file {path} has no result for {missing} (it has {sorted(results)}).")
    for task, metrics in results.items():
        errors = {k: v for k, v in metrics.items()
                  if "error" in k.lower() or (isinstance(v, str) and v.lower().startswith("error"))}
        if errors:
            raise LmmsEvalFailed(f"lmms-eval's result for {task} in {path} holds an error: {errors}")
    return report


def run_lmms_eval(lmms_args: list[str], num_processes: int = 1, env: dict | None = None) -> str:
    """Run lmms-eval's CLI and check its results; returns the results file's path."""
    lmms_args = list(lmms_args)
    output_path = _option(lmms_args, "--output_path")
    if output_path is None:
        output_path = DEFAULT_OUTPUT_PATH
        lmms_args += ["--output_path", output_path]
    tasks = [t for t in (_option(lmms_args, "--tasks") or "").split(",") if t]
    since = time.time() - 1  # file times may be rounded down to the second
    returncode = subprocess.run(lmms_eval_command(lmms_args, num_processes), env=env).returncode
    files = find_results(output_path, since)
    if not files:
        raise LmmsEvalFailed(f"lmms-eval wrote no results file under {output_path} (exit code {returncode}): the "
                             "evaluation failed; its log above says why.")
    check_results(files[-1], tasks)
    if returncode != 0:
        raise LmmsEvalFailed(f"lmms-eval exited with code {returncode} after writing {files[-1]}.")
    return files[-1]


def main(argv: list[str] | None = None) -> str:
    """`gap lmms-eval [--num_processes N] LMMS_EVAL_ARGS...` (every other argument goes to lmms-eval as it is)."""
    parser = argparse.ArgumentParser(
        prog="gap lmms-eval", description="Run lmms-eval's CLI and fail unless its results file holds every task's "
        "result (lmms-eval itself exits 0 when an evaluation fails). Other arguments go to lmms-eval: `lmms-eval "
        "--help` lists them.")
    parser.add_argument("--num_processes", type=int, default=1,
                        help="Data-parallel processes, one model copy each: accelerate launch on GPUs (one per GPU), "
                        "torchrun on CPU.")
    own, lmms_args = parser.parse_known_args(argv)
    if not lmms_args:
        raise SystemExit(parser.format_help() + "\nNo lmms-eval arguments given (e.g. --model gap --tasks ...).")
    path = run_lmms_eval(lmms_args, own.num_processes)
    print(f"gap lmms-eval: results in {path}")
    return path


def write_tasks_main(argv: list[str] | None = None) -> list[str]:
    """`gap lmms-eval-tasks`: write the `--include_path` folder of local tasks (`tasks.write_task_folder`)."""
    from .tasks import BENCHMARKS, write_task_folder

    parser = argparse.ArgumentParser(
        prog="gap lmms-eval-tasks", description="Write lmms-eval task YAMLs over local data (an --include_path "
        "folder): a task over rows in GAP's schema, scored as `gap eval` scores them, and local copies of the "
        "benchmarks' own tasks (named <task>_local).")
    parser.add_argument("--output_dir", required=True, help="The folder to pass to lmms-eval's --include_path.")
    parser.add_argument("--gap_dataset", help="A save_to_disk Dataset / DatasetDict in GAP's schema.")
    parser.add_argument("--gap_split", default="test", help="Its split (default test).")
    parser.add_argument("--gap_task", default="gap_shapes", help="The task's name (default gap_shapes).")
    parser.add_argument("--gap_max_new_tokens", type=int, default=64, help="As `gap eval --max_new_tokens`.")
    for name, (_, split) in BENCHMARKS.items():
        parser.add_argument(f"--{name}", metavar="DIR", help=f"A save_to_disk DatasetDict with the split {split!r} "
                            f"in the benchmark's own columns: writes {name}_local.")
    parser.add_argument("--judge", default="true", choices=["true", "false"],
                        help="false: HRBench / MathVista score with their rules only, never calling the LLM judge.")
    args = parser.parse_args(argv)
    benchmarks = {name: getattr(args, name) for name in BENCHMARKS if getattr(args, name)}
    names = write_task_folder(args.output_dir, gap_dataset=args.gap_dataset, gap_split=args.gap_split,
                              gap_task=args.gap_task, gap_max_new_tokens=args.gap_max_new_tokens,
                              benchmarks=benchmarks, judge=args.judge == "true")
    print(f"gap lmms-eval-tasks: wrote {args.output_dir}; run with --include_path {args.output_dir} "
          f"--tasks {','.join(names)}")
    return names


__all__ = ["LmmsEvalFailed", "check_results", "find_results", "lmms_eval_command", "main", "run_lmms_eval",
           "write_tasks_main"]
