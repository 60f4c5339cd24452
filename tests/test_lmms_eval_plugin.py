"""The lmms-eval model `gap` (trainers/lmms_eval_plugin), run by lmms-eval's own CLI in subprocesses, offline.

One saved tiny GAP checkpoint whose generation config opens a latent span at the first step of every reply (a
`sequence_bias` on `<|latent_start|>` right after `<|im_start|>assistant\\n`), so every reply goes through the latent
path; its feedback is `raw` (the final hidden state as is), large enough for the fed vectors to move this random
model's next tokens (with `pca`'s unfitted head they do not, within 24 tokens). Three lmms-eval runs in all (each pays
lmms-eval's start-up and task indexing, ~10 s on 2 cores).
"""

import base64
import glob
import io
import json
import os
import warnings

import datasets
import pytest
from PIL import Image
from testing_utils import ROOT, run_gap

from modeling_gap.configuration_gap import LATENT_MARKER
from trainers.arguments import EvalArguments
from trainers.demo import make_splits, save_test_split
from trainers.evaluation import run_evaluation
from trainers.lmms_eval_plugin.runner import LmmsEvalFailed, check_results, write_tasks_main
from trainers.lmms_eval_plugin.tasks import write_task_folder
from trainers.tiny import build_tiny_gap

with warnings.catch_warnings():  # importing lmms-eval turns every warning off (lmms_eval.utils): not for later tests
    from trainers.lmms_eval_plugin.model import GapLmmsConfig

MAX_NEW_TOKENS = 24
BENCHMARK_TASKS = ["vstar_bench_local", "hrbench4k_local", "mmerealworld_local", "mathvista_testmini_local"]


def lmms_env():
    """Offline, and any LLM-judge call would fail (nothing listens on port 9): the judge must not be called."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPENAI_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               OPENAI_API_URL="http://127.0.0.1:9/v1/chat/completions", OPENAI_API_KEY="none",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def samples(output_dir, task) -> list[dict]:
    """lmms-eval's logged samples of `task` (`--log_samples`), in document order."""
    (path,) = glob.glob(os.path.join(output_dir, "**", f"*_samples_{task}.jsonl"), recursive=True)
    with open(path) as f:
        return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])


def predictions(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def gap_eval(model, data, output_dir, batch_size=2, **options) -> tuple[dict, list[dict]]:
    args = EvalArguments(model_name_or_path=str(model), dataset_name=str(data), max_new_tokens=MAX_NEW_TOKENS,
                         batch_size=batch_size, output_dir=str(output_dir), **options)
    return run_evaluation(args), predictions(output_dir)


# ---- local stand-ins of the four benchmarks: their real columns and splits, two rows each ------------------------
def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_benchmark_stand_ins(root) -> dict[str, str]:
    images = [Image.new("RGB", (56, 56), color) for color in [(200, 30, 30), (30, 30, 200)]]
    folders = {name: str(root / name) for name in ("vstar_bench", "hrbench4k", "mmerealworld", "mathvista_testmini")}
    vstar = datasets.Dataset.from_dict(
        dict(image=images, text=["What is the colour of the cup? (A) red (B) blue (C) green (D) white",
                                 "Is the dog on the left of the cat? (A) yes (B) no"],
             label=["A", "B"], question_id=[0, 1], category=["direct_attributes", "relative_position"]),
        features=datasets.Features(image=datasets.Image(), text=datasets.Value("string"),
                                   label=datasets.Value("string"), question_id=datasets.Value("int64"),
                                   category=datasets.Value("string")))
    datasets.DatasetDict(test=vstar).save_to_disk(folders["vstar_bench"])
    hrbench = datasets.Dataset.from_dict(dict(
        index=[0, 1], image=[_png_base64(i) for i in images], question=["What colour is the sign?", "Where is it?"],
        A=["red", "left"], B=["blue", "right"], C=["green", "top"], D=["white", "bottom"], answer=["A", "B"],
        category=["single", "cross"], cycle_category=["c0", "c1"]))
    datasets.DatasetDict(hrbench_4k=hrbench).save_to_disk(folders["hrbench4k"])
    mme = datasets.Dataset.from_dict({
        "index": ["0", "1"], "question": ["How many cars are there?", "What does the board say?"],
        "multi-choice options": [["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) none"],
                                 ["(A) stop", "(B) go", "(C) exit", "(D) wait", "(E) none"]],
        "answer": ["B", "A"], "category": ["Perception/Monitoring", "Reasoning/Autonomous_Driving"],
        "l2-category": ["counting", "intention"], "bytes": [_png_base64(i) for i in images]})
    datasets.DatasetDict(train=mme).save_to_disk(folders["mmerealworld"])
    metadata = dict(split="testmini", language="english", source="stand-in", category="math-targeted-vqa",
                    task="figure question answering", context="synthetic scene", grade="elementary school",
                    skills=["arithmetic reasoning"])
    mathvista = datasets.Dataset.from_dict(dict(
        pid=["1", "2"], question=["How many squares are there?", "Which colour is the square?"],
        query=["Hint: answer with an integer.\nQuestion: How many squares are there?",
               "Hint: choose an option.\nQuestion: Which colour is the square?\nChoices:\n(A) red\n(B) blue"],
        decoded_image=images, choices=[None, ["red", "blue"]], answer=["2", "blue"],
        question_type=["free_form", "multi_choice"], answer_type=["integer", "text"], precision=[None, None],
        unit=[None, None], metadata=[metadata, metadata]))
    datasets.DatasetDict(testmini=mathvista).save_to_disk(folders["mathvista_testmini"])
    return folders


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The checkpoint, the demo's held-out boards with answers pinned to the model's own replies on half the rows,
    `gap eval` on them, the benchmark stand-ins, and the `--include_path` folder."""
    root = tmp_path_factory.mktemp("lmms_eval")
    model, processor = build_tiny_gap(seed=0, latent_feedback="raw")
    opens_span = processor.tokenizer.encode("<|im_start|>assistant\n") + [model.config.latent_start_token_id]
    model.generation_config.sequence_bias = [[opens_span, 100.0]]
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")

    _, test = make_splits(train_rows=8, test_rows=6, seed=0)
    boards = save_test_split(test, str(root / "boards"))
    _, replies = gap_eval(root / "model", boards, root / "eval-boards")
    pinned = datasets.load_from_disk(boards)  # answers: the model's own reply on rows 0, 2, 4, the board's colour else
    answers = [r["generated"] if i % 2 == 0 else a for i, (r, a) in enumerate(zip(replies, pinned["answer"]))]
    pinned = pinned.remove_columns("answer").add_column("answer", answers)
    pinned.save_to_disk(str(root / "boards-pinned"))
    results, records = gap_eval(root / "model", root / "boards-pinned", root / "eval")
    _, zero_records = gap_eval(root / "model", root / "boards-pinned", root / "eval-zero", batch_size=1,
                               latent_intervention="zero")

    stand_ins = write_benchmark_stand_ins(root)
    names = write_tasks_main(["--output_dir", str(root / "tasks"), "--gap_dataset", str(root / "boards-pinned"),
                              "--judge", "false", *[a for n, p in stand_ins.items() for a in (f"--{n}", p)]])
    assert names == ["gap_shapes", *BENCHMARK_TASKS]
    return dict(root=root, model=str(root / "model"), tasks=str(root / "tasks"), results=results, records=records,
                zero_records=zero_records)


@pytest.fixture(scope="module")
def harness_run(workspace):
    """`gap lmms-eval` (lmms-eval's CLI) with the model `gap` on the GAP task and the four benchmarks, one run."""
    output = workspace["root"] / "lmms-out"
    result = run_gap(
        "lmms-eval", "--model", "gap",
        "--model_args", f"pretrained={workspace['model']},max_new_tokens={MAX_NEW_TOKENS}",
        "--tasks", ",".join(["gap_shapes", *BENCHMARK_TASKS]), "--include_path", workspace["tasks"],
        "--batch_size", "2", "--log_samples", "--output_path", str(output), env=lmms_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = glob.glob(str(output / "**" / "*_results.json"), recursive=True)
    assert f"results in {path}" in result.stdout
    with open(path) as f:
        return dict(report=json.load(f), output=str(output))


def test_lmms_eval_scores_gap_rows_as_gap_eval_does(workspace, harness_run):
    # gap eval: the pinned rows are right, the others wrong (the model's replies are not the boards' colours)
    assert workspace["results"]["accuracy"] == 0.5 and workspace["results"]["total"] == 6
    assert all(r["latent_spans"] == 1 for r in workspace["records"])  # every reply went through a latent span
    # lmms-eval, same rows, same prompt, greedy: the same replies token for token, so the same accuracy
    assert harness_run["report"]["results"]["gap_shapes"]["accuracy,none"] == workspace["results"]["accuracy"]
    logged = samples(harness_run["output"], "gap_shapes")  # (lmms-eval logs replies stripped)
    assert [s["filtered_resps"] for s in logged] == [r["generated"].strip() for r in workspace["records"]]
    assert [s["accuracy"] for s in logged] == [float(r["correct"]) for r in workspace["records"]]


def test_the_four_benchmarks_run_with_their_own_task_yamls(harness_run):
    results = harness_run["report"]["results"]
    assert results["vstar_bench_local"]["vstar_overall_acc,none"] == 0.0
    assert {"single,none", "cross,none", "average,none"} <= set(results["hrbench4k_local"])
    assert "mme_realworld_score,none" in results["mmerealworld_local"]
    for variant in ("cot", "solution", "format"):
        assert f"mathvista_testmini_{variant}_local" in results
    assert harness_run["report"]["n-samples"]["vstar_bench_local"]["effective"] == 2
    # the harness's prompts (its doc_to_text), not ours
    assert samples(harness_run["output"], "vstar_bench_local")[0]["input"].endswith(
        "Answer with the option's letter from the given choices directly.")
    assert "Answer the option letter directly." in samples(harness_run["output"], "hrbench4k_local")[0]["input"]
    assert "The best answer is:" in samples(harness_run["output"], "mmerealworld_local")[0]["input"]
    cot = samples(harness_run["output"], "mathvista_testmini_cot_local")
    assert "How many squares are there?" in cot[0]["input"]
    # the rules without the judge: an unreadable reply is HRBench's "no answer" (Z), not a network call
    assert [s["average"]["gpt_score"] for s in samples(harness_run["output"], "hrbench4k_local")] == [0, 0]


def test_latent_intervention_zero_through_model_args_changes_the_tokens(workspace, harness_run):
    # two data-parallel processes (torchrun on CPU), each with its copy of the model and half the documents
    output = workspace["root"] / "lmms-zero"
    model_args = (f"pretrained={workspace['model']},max_new_tokens={MAX_NEW_TOKENS},latent_intervention=zero,"
                  "show_latent_spans=true")
    result = run_gap("lmms-eval", "--num_processes", "2", "--model", "gap", "--model_args", model_args,
                     "--tasks", "gap_shapes", "--include_path", workspace["tasks"], "--batch_size", "1",
                     "--log_samples", "--output_path", str(output), env=lmms_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Running on rank 1" in result.stdout + result.stderr
    zero = [s["filtered_resps"] for s in samples(str(output), "gap_shapes")]
    assert len(zero) == 6
    assert all(text.startswith(LATENT_MARKER) for text in zero)  # show_latent_spans: where the span was
    zero = [text.removeprefix(LATENT_MARKER) for text in zero]
    assert zero == [r["generated"].strip() for r in workspace["zero_records"]]  # as gap eval --latent_intervention zero
    baseline = [s["filtered_resps"] for s in samples(harness_run["output"], "gap_shapes")]
    assert sum(z != b for z, b in zip(zero, baseline)) >= 1


def test_gap_lmms_eval_fails_when_lmms_eval_exits_0_without_results(workspace):
    output = workspace["root"] / "lmms-failed"
    result = run_gap("lmms-eval", "--model", "gap", "--model_args",
                     f"pretrained={workspace['model']},latent_intervention=sideways", "--tasks", "gap_shapes",
                     "--include_path", workspace["tasks"], "--output_path", str(output), env=lmms_env())
    assert result.returncode == 1
    assert "latent_intervention must be one of" in result.stdout + result.stderr  # lmms-eval's log of the failure
    assert f"lmms-eval wrote no results file under {output} (exit code 0)" in result.stderr


def test_results_check_names_a_missing_task_and_an_error(tmp_path):
    path = tmp_path / "x_results.json"
    path.write_text(json.dumps({"results": {"gap_shapes": {"accuracy,none": 0.5}}, "group_subtasks": {}}))
    assert check_results(str(path), ["gap_shapes"])["results"]["gap_shapes"]["accuracy,none"] == 0.5
    with pytest.raises(LmmsEvalFailed, match=r"no result for \['vstar_bench_local'\]"):
        check_results(str(path), ["gap_shapes", "vstar_bench_local"])
    path.write_text(json.dumps({"results": {"gap_shapes": {"error": "Traceback ..."}}}))
    with pytest.raises(LmmsEvalFailed, match="gap_shapes .* holds an error"):
        check_results(str(path), ["gap_shapes"])


def test_model_args_are_checked_and_typed():
    config = GapLmmsConfig.from_model_args(pretrained="ORG/gap-7b", batch_size="4", max_latent_spans=1,
                                           latent_intervention="noise", latent_intervention_seed=3,
                                           show_latent_spans=True, device_map="none")
    assert (config.batch_size, config.max_latent_spans, config.device_map) == (4, 1, None)
    with pytest.raises(ValueError, match=r"unknown model argument\(s\) \['latent_mode'\]"):
        GapLmmsConfig.from_model_args(pretrained="ORG/gap-7b", latent_mode="zero")
    with pytest.raises(ValueError, match="batch_size auto is not supported"):
        GapLmmsConfig.from_model_args(pretrained="ORG/gap-7b", batch_size="auto")
    with pytest.raises(ValueError, match="pretrained is required"):
        GapLmmsConfig.from_model_args(latent_intervention="zero")


def test_task_folder_refuses_benchmark_data_without_the_split_or_a_column(tmp_path):
    data = datasets.DatasetDict(validation=datasets.Dataset.from_dict({"text": ["q"]}))
    data.save_to_disk(str(tmp_path / "vstar"))
    with pytest.raises(ValueError, match="with the split 'test'.*found \\['validation'\\]"):
        write_task_folder(str(tmp_path / "tasks"), benchmarks={"vstar_bench": str(tmp_path / "vstar")})
    data = datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": ["q"], "label": ["A"]}))
    data.save_to_disk(str(tmp_path / "vstar2"))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['image', 'question_id', 'category'\]"):
        write_task_folder(str(tmp_path / "tasks"), benchmarks={"vstar_bench": str(tmp_path / "vstar2")})


def test_a_stock_checkpoint_loads_with_a_preset_and_answers_in_batches(tmp_path):
    """In process, through lmms-eval's registry and its `Instance`s: a stock checkpoint converted with the Monet
    preset answers 3 requests in batches of 2 exactly as `generate_answers` does on the same conversion; the model
    argument `max_new_tokens` overrides the request's; `until` cuts the text."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model
    from testing_utils import COLORS, solid_image

    from modeling_gap import from_qwen2_5_vl
    from trainers.evaluation import EvalRow, generate_answers
    from trainers.tiny import save_tiny_qwen2_5_vl

    stock = save_tiny_qwen2_5_vl(str(tmp_path / "stock"))
    lm = get_model("gap").create_from_arg_string(
        f"pretrained={stock},preset=monet,num_latent_tokens=3,max_new_tokens=6", {"batch_size": "2", "device": None})
    assert (lm.model.config.latent_start_token, lm.model.config.num_latent_tokens) == ("<abs_vis_token>", 3)
    questions = ["Colour?", "Which corner?", "Why?"]
    lm.task_dict = {"t": {"test": [{"image": solid_image(COLORS[i]), "question": q} for i, q in enumerate(questions)]}}

    def doc_to_messages(doc):
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                             {"type": "text", "text": doc["question"]}]}]

    model, processor = from_qwen2_5_vl(stock, preset="monet", num_latent_tokens=3)
    rows = [EvalRow(images=[solid_image(COLORS[i])], question=q, answer="x", choices=None, kind="text")
            for i, q in enumerate(questions)]
    expected = [r["generated"] for r in generate_answers(model.eval(), processor, rows, batch_size=2, progress=False,
                                                         max_new_tokens=6)]
    stop = expected[0][2:4]
    requests = [Instance("generate_until", ("", doc_to_messages, {"max_new_tokens": 64, "until": [stop]}, i, "t",
                                            "test"), idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
                for i in range(3)]
    try:
        results = lm.generate_until(requests)
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # the model's Accelerator: none left for later tests
    assert [r.text for r in results] == [text.split(stop)[0] for text in expected]
    assert len(results[0].text) < len(expected[0]) and all(r.token_counts.output_tokens <= 6 for r in results)
