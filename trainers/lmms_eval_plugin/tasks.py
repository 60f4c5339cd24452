"""lmms-eval tasks over local data: an `--include_path` folder written by `write_task_folder` (`gap lmms-eval-tasks`).

- `gap_shapes` (the name is an option): a `save_to_disk` dataset in GAP's schema (the synthetic boards, the demo's
  held-out split, converted rows), prompted and scored exactly as `gap eval` does (`trainers.evaluation`: the user
  turn's question, the same answer extraction), so the two accuracies agree on the same rows with greedy decoding.
- `<benchmark>_local` for `vstar_bench`, `hrbench4k`, `mmerealworld`, and the group `mathvista_testmini_local` (its
  three prompt variants): each YAML `include`s lmms-eval's own task YAML and changes only where the data comes from
  (`dataset_path: DIR`, `load_from_disk`), so prompts, answer extraction and metrics are the harness's. The data is
  the benchmark's own columns saved with `save_to_disk` (e.g. `load_dataset("lmms-lab-encoder/vstar-bench")`
  saved on a machine with the network); the task names get `_local` because lmms-eval's built-in names take
  precedence over `--include_path`.

Judge: HRBench and MathVista ask an LLM judge (OpenAI API: `OPENAI_API_KEY`, `MODEL_VERSION`, ...) to extract the
answer when their rules cannot read the reply. With `judge=False` their `process_results` run with the judge call
replaced by the judge's "no answer" (HRBench: `Z`; MathVista: the empty extraction it uses when the judge fails), so a
reply the rules cannot read scores 0 and nothing goes over the network.
"""

import contextlib
import os

import yaml

from ..evaluation import extract_answer, format_question, reference_answer, standardize_row

# lmms-eval task (or group) -> (its YAML under lmms_eval/tasks/, the split the data must hold)
BENCHMARKS = {
    "vstar_bench": ("vstar_bench/vstar_bench.yaml", "test"),
    "hrbench4k": ("hrbench/hrbench4k.yaml", "hrbench_4k"),
    "mmerealworld": ("mme_realworld/mme_realworld.yaml", "train"),
    "mathvista_testmini": ("mathvista/mathvista_testmini.yaml", "testmini"),
}
# The columns each task's functions read (lmms-eval 0.7.3), checked before a local copy is written.
BENCHMARK_COLUMNS = {
    "vstar_bench": ["image", "text", "label", "question_id", "category"],
    "hrbench4k": ["index", "image", "question", "A", "B", "C", "D", "answer", "category", "cycle_category"],
    "mmerealworld": ["index", "bytes", "question", "multi-choice options", "answer", "category", "l2-category"],
    "mathvista_testmini": ["pid", "decoded_image", "question", "query", "choices", "answer", "question_type",
                           "answer_type", "metadata"],
}
LOCAL_SUFFIX = "_local"
UTILS_MODULE = "gap_lmms_tasks"  # the `!function` module written beside the YAMLs


class Function(str):
    """A `!function module.name` value of a task YAML (lmms-eval imports it from the YAML's folder)."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _function(name: str) -> Function:
    return Function(f"{UTILS_MODULE}.{name}")


# ---- gap_shapes: GAP's rows, scored as `gap eval` scores them ---------------------------------------------------
def gap_doc_to_visual(doc):
    return [image.convert("RGB") for image in standardize_row(doc, "gap").images]


def gap_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return format_question(standardize_row(doc, "gap"))


def gap_process_results(doc, results):
    """`accuracy` (1.0 / 0.0): the answer extracted from the reply against the row's, as `gap eval` compares them."""
    row = standardize_row(doc, "gap")
    prediction = extract_answer(results[0], row.kind, row.choices)
    return {"accuracy": float(bool(prediction) and prediction == reference_answer(row))}


def gap_task_config(task: str, dataset_path: str, split: str, max_new_tokens: int) -> dict:
    return {
        "task": task,
        "dataset_path": os.path.abspath(dataset_path),
        "dataset_kwargs": {"load_from_disk": True},
        "test_split": split,
        "output_type": "generate_until",
        "doc_to_visual": _function("gap_doc_to_visual"),
        "doc_to_text": _function("gap_doc_to_text"),
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False},
        "process_results": _function("gap_process_results"),
        "process_results_use_image": True,  # the rows are read as `gap eval` reads them, images included
        "metric_list": [{"metric": "accuracy", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 0.0},
    }


# ---- the benchmarks' own process_results without the LLM judge ----------------------------------------------------
@contextlib.contextmanager
def _judge_replaced(evaluator, answer):
    """`evaluator.get_chat_response` answers `answer(*args, **kwargs)` instead of calling the API, for the block."""
    evaluator.get_chat_response = answer
    try:
        yield
    finally:
        del evaluator.get_chat_response


def hrbench_process_results_without_judge(doc, results):
    """HRBench's `process_results`; where it would ask the judge, the judge's no-answer `Z`."""
    from lmms_eval.tasks.hrbench import utils

    def rules_only(data, **_):
        return {**data, "gpt_prediction": utils.hrbench_evaluator.can_infer(data["prediction"], data["options"]) or "Z"}

    with _judge_replaced(utils.hrbench_evaluator, rules_only):
        return utils.hrbench_process_results(doc, results)


def mathvista_process_results_without_judge(doc, results):
    """MathVista's `process_results`; where it would ask the judge, the empty extraction of a failed judge call."""
    from lmms_eval.tasks.mathvista import utils

    with _judge_replaced(utils.mathvista_evaluator, lambda *args, **kwargs: ""):
        return utils.mathvista_process_results(doc, results)


JUDGE_FREE_PROCESS_RESULTS = {
    "hrbench4k": "hrbench_process_results_without_judge",
    "mathvista_testmini": "mathvista_process_results_without_judge",
}


# ---- the folder ---------------------------------------------------------------------------------------------------
def lmms_eval_tasks_dir() -> str:
    import lmms_eval.tasks

    return os.path.dirname(os.path.abspath(lmms_eval.tasks.__file__))


def _read_yaml(path: str) -> dict:
    """A task YAML read without running its `!function`s (as lmms-eval indexes them)."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))
    with open(path) as f:
        return yaml.load(f, Loader=Loader)


def _local_task(benchmark: str, task: str, include: str, dataset_path: str, judge: bool) -> dict:
    # `tag: []`: the local copy does not join the tags (task collections) of the built-in task
    config = {"include": include, "task": task + LOCAL_SUFFIX, "tag": [], "dataset_path": os.path.abspath(dataset_path),
              "dataset_kwargs": {"load_from_disk": True}}
    if not judge and benchmark in JUDGE_FREE_PROCESS_RESULTS:
        config["process_results"] = _function(JUDGE_FREE_PROCESS_RESULTS[benchmark])
    return config


def benchmark_task_configs(benchmark: str, dataset_path: str, judge: bool = True) -> dict[str, dict]:
    """`{file name: YAML config}` of one benchmark's local task (or group and its tasks) over `dataset_path`."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; local copies exist for {sorted(BENCHMARKS)}.")
    relative, split = BENCHMARKS[benchmark]
    path = os.path.join(lmms_eval_tasks_dir(), relative)
    _check_data(benchmark, dataset_path, split)
    config = _read_yaml(path)
    if "group" not in config:
        return {benchmark + LOCAL_SUFFIX + ".yaml": _local_task(benchmark, benchmark, path, dataset_path, judge)}
    files = {}
    for task in config["task"]:
        task_path = os.path.join(os.path.dirname(path), task + ".yaml")
        files[task + LOCAL_SUFFIX + ".yaml"] = _local_task(benchmark, task, task_path, dataset_path, judge)
    group = {**config, "group": config["group"] + LOCAL_SUFFIX, "task": [t + LOCAL_SUFFIX for t in config["task"]]}
    files[benchmark + LOCAL_SUFFIX + ".yaml"] = group
    return files


def _check_data(benchmark: str, dataset_path: str, split: str):
    """The folder holds a DatasetDict with the task's split and the columns its functions read."""
    import datasets

    if not os.path.isdir(dataset_path):
        raise ValueError(f"{benchmark}: no such directory {dataset_path!r} (a `save_to_disk` DatasetDict).")
    data = datasets.load_from_disk(dataset_path)
    if not isinstance(data, datasets.DatasetDict) or split not in data:
        found = sorted(data) if isinstance(data, datasets.DatasetDict) else "a Dataset, not a DatasetDict"
        raise ValueError(f"{benchmark}: {dataset_path} must be a DatasetDict with the split {split!r} that lmms-eval's "
                         f"task reads; found {found}. Save it as DatasetDict({{{split!r}: dataset}}).")
    missing = [c for c in BENCHMARK_COLUMNS[benchmark] if c not in data[split].column_names]
    if missing:
        raise ValueError(f"{benchmark}: the split {split!r} of {dataset_path} lacks the column(s) {missing} that "
                         f"lmms-eval's task reads (it has {data[split].column_names}): save the benchmark's own "
                         "columns.")


def _as_dataset_dict(path: str, split: str, copy_to: str) -> str:
    """`path` if it holds a DatasetDict with `split`; a plain Dataset (as `gap eval` also reads, e.g. the demo's
    `test-data/`) is saved again under `copy_to` as `DatasetDict({split: ...})`, which is what lmms-eval loads."""
    import datasets

    if not os.path.isdir(path):
        raise ValueError(f"--gap_dataset {path!r}: no such directory (a `save_to_disk` Dataset or DatasetDict).")
    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"--gap_dataset {path}: no split {split!r} (it has {sorted(data)}); pass --gap_split.")
        return path
    datasets.DatasetDict({split: data}).save_to_disk(copy_to)
    return copy_to


def write_task_folder(output_dir: str, gap_dataset: str | None = None, gap_split: str = "test",
                      gap_task: str = "gap_shapes", gap_max_new_tokens: int = 64,
                      benchmarks: dict[str, str] | None = None, judge: bool = True) -> list[str]:
    """Write the `--include_path` folder: the GAP-schema task over `gap_dataset` and the local copy of each
    benchmark in `benchmarks` (`{"vstar_bench": DIR, ...}`). Returns the task (and group) names to pass to
    `--tasks`."""
    if not gap_dataset and not benchmarks:
        raise ValueError("nothing to write: give a GAP-schema dataset (--gap_dataset) and/or benchmark data folders.")
    os.makedirs(output_dir, exist_ok=True)
    files, names = {}, []
    if gap_dataset:
        gap_dataset = _as_dataset_dict(gap_dataset, gap_split, os.path.join(output_dir, "data", gap_task))
        files[gap_task + ".yaml"] = gap_task_config(gap_task, gap_dataset, gap_split, gap_max_new_tokens)
        names.append(gap_task)
    for benchmark, path in (benchmarks or {}).items():
        files.update(benchmark_task_configs(benchmark, path, judge=judge))
        names.append(benchmark + LOCAL_SUFFIX)
    with open(os.path.join(output_dir, UTILS_MODULE + ".py"), "w") as f:
        f.write('"""Written by `gap lmms-eval-tasks`: the functions the task YAMLs here name."""\n'
                "from trainers.lmms_eval_plugin.tasks import *  # noqa: F401,F403\n")
    for name, config in files.items():
        with open(os.path.join(output_dir, name), "w") as f:
            yaml.dump(config, f, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True)
    return names


__all__ = [
    "BENCHMARKS",
    "BENCHMARK_COLUMNS",
    "benchmark_task_configs",
    "gap_doc_to_text",
    "gap_doc_to_visual",
    "gap_process_results",
    "gap_task_config",
    "hrbench_process_results_without_judge",
    "mathvista_process_results_without_judge",
    "write_task_folder",
]
