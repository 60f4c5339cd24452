"""The offline GAP demo and its study: the named-shape task, every variant trained with `GapSFTTrainer`, evaluated
closed loop, teacher-forced and under each latent intervention, with 95 % intervals across test rows and seeds.

    python recipes/demo.py           # `make demo`: a small slice (seed 0, budgets 200 and 400 steps, text SFT,
                                     # ema_norm and pca, 100 test rows)
    python recipes/demo.py --study   # the study: every variant, seeds 0, 1, 2, budgets 100, 200, 400, 800 steps

The task (`trainers.synthetic.make_shape_rows`): an 84x84 board of 3x3 cells holds four shapes (circle, square,
triangle, cross), each once, in random cells and colours (four colours); "What colour is the triangle?" (chance
0.25). The answer needs the named shape located among the distractors. The aux image of the span is the crop of its
cell. The assistant text states where to look before the span and the answer after it: "Find the triangle.
<|latent|> Answer: red" (`--intent name`, the default: the model can produce it from the question), or "The
triangle is in row 2, column 3. <|latent|> Answer: red" (`--intent position`: from the question and the image; the
tiny model does not learn to write the position within these budgets). The generated intent of a few rows is
reported, and how often it is the gold one. Each seed draws its own training boards and test
boards; no test board is pixel-identical to a training board (checked by hashing the image bytes: the run fails
otherwise). The aux crops are few (shape x colour) and do recur: only the question images are kept disjoint.

Variants (the same tiny random Qwen2.5-VL: width 64, 2 layers, K = 4 latents, frozen vision tower; the same rows,
batch and optimizer):
- text SFT: the same text without the span; oracle: the aux image as a second input image (a ceiling);
- raw / ema_norm / pca: latent spans where the text-SFT model of the same seed struggles (capacity: its sampled pass
  rate on the training row <= 0.5), fed back raw, norm-calibrated, or through the PCA-aligned head;
- pca, no capacity: every row keeps its span;
- pca, zero latents (control) and pca, noise latents (control): as pca, but in training the latent slots receive
  zeros, or fresh Gaussian noise at the visual embeddings' norm (the latent loss still trains the head): the latents
  carry nothing the model could learn to use. What an intervention does to them is the metric's baseline: the zero
  control never saw a non-zero latent (any change is a reaction to unfamiliar inputs), the noise control learned to
  ignore varied ones.

Each budget is a checkpoint along one run per variant and seed (warm-up, then a constant learning rate, so a
checkpoint is what a run of that length gives, less any decay). At each: closed-loop accuracy, teacher-forced
accuracy (gold intent and the aux image's true targets in the prompt), accuracy under each intervention (zero,
noise, shuffle, mean, drop), the latent / visual-embedding norm ratio of the fed latents, and the generated intent;
at the last budget, a linear probe (`trainers.latent_probe`) of the crop's colour (the answer) and shape from each
fed latent and from the teacher-forced targets, with shuffled labels for reference.
Intervals: 95 % percentile bootstrap, seeds resampled and then test rows within each (paired for differences).
Writes `results.md`, `results.json` (strict JSON), `accuracy.png`; the demo slice also saves the pca checkpoint
(`pca-checkpoint/`, seed 0 at the last budget), the test split (`test-data/`), the norm diagnosis where the latents
are fed (`norms.png`, `norms.json`: `trainers.diagnostics.diagnose`) and `lens_*.png`, and prints the `gap probe`,
`gap probe-latents`, `gap diagnose-norms` and `gap latent-lens` commands that run on them. `--threads` (default 1) sets
torch's thread count: the same seeds and flags give the same numbers.
"""

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time

import torch

INTERVENTIONS = ["zero", "noise", "shuffle", "mean", "drop"]
# name -> (kind, latent feedback, capacity-guided, what the latent slots receive in training: None = the targets)
VARIANTS = {
    "text SFT": ("text", "pca", True, None),
    "oracle": ("oracle", "pca", True, None),
    "raw": ("latent", "raw", True, None),
    "ema_norm": ("latent", "ema_norm", True, None),
    "pca": ("latent", "pca", True, None),
    "pca, no capacity": ("latent", "pca", False, None),
    "pca, zero latents (control)": ("latent", "pca", True, "zero"),
    "pca, noise latents (control)": ("latent", "pca", True, "noise"),
}
TASK = dict(image_size=84, grid=3, num_shapes=4, num_colors=4, aux_size=56)
CONTROL = "pca, zero latents (control)"
DEMO_SLICE = dict(seeds=[0], budgets=[200, 400], variants=["text SFT", "ema_norm", "pca"], test_rows=100)
STUDY = dict(seeds=[0, 1, 2], budgets=[100, 200, 400, 800], variants=list(VARIANTS), test_rows=200)


class SplitOverlapError(ValueError):
    """A test image is pixel-identical to a training image."""


# ---- the task and its splits -------------------------------------------------------------------------------------
def make_splits(train_rows: int, test_rows: int, seed: int, task: dict | None = None, intent: str = "name"):
    """(train, test) rows of the named-shape task for one seed; test boards are drawn excluding every training board,
    then `check_disjoint` verifies it."""
    from trainers.synthetic import make_shape_rows

    task = {**TASK, **(task or {}), "intent": intent}
    train = make_shape_rows(train_rows, seed=seed, **task)
    test = make_shape_rows(test_rows, seed=1_000_003 + seed, exclude_hashes={r["image_hash"] for r in train}, **task)
    check_disjoint(train, test)
    return train, test


def check_disjoint(train: list[dict], test: list[dict]) -> None:
    """Raise `SplitOverlapError` if any test question image is pixel-identical to a training one (hashes recomputed
    from the pixels, not read from the rows)."""
    from trainers.synthetic import image_hash

    seen = {image_hash(image) for row in train for image in row["images"]}
    shared = [i for i, row in enumerate(test) if any(image_hash(image) in seen for image in row["images"])]
    if shared:
        raise SplitOverlapError(f"{len(shared)} of {len(test)} test rows have an image pixel-identical to a training "
                                f"image (test rows {shared[:10]}): the split is not held out.")


def intent_of(row: dict) -> str:
    return row["messages"][1]["content"][0]["text"].split("<|latent|>")[0].strip()


def variant_rows(rows: list[dict], kind: str, use_latent=None) -> list[dict]:
    """Training rows for one variant: `oracle` (aux image as a second input image, no span), `text` (no span) or
    `latent` (spans kept where `use_latent[i]`, all when None)."""
    from trainers.schema import remove_latent_markers

    out = []
    for i, row in enumerate(rows):
        row = {k: row[k] for k in ("images", "messages", "aux_images", "answer")}
        if kind == "oracle":
            text = remove_latent_markers(row["messages"][1]["content"][0]["text"])
            row["images"] = row["images"] + row["aux_images"]
            row["messages"] = [
                {"role": "user", "content": [{"type": "image", "text": None}] * 2 + row["messages"][0]["content"][1:]},
                {"role": "assistant", "content": [{"type": "text", "text": text}]},
            ]
            row["aux_images"], row["use_latent"] = [], False
        else:
            row["use_latent"] = kind == "latent" and (use_latent is None or bool(use_latent[i]))
        out.append(row)
    return out


def to_dataset(rows: list[dict]):
    import datasets

    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
            {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
        "aux_images": datasets.List(datasets.Image()),
        "answer": datasets.Value("string"),
        "use_latent": datasets.Value("bool"),
    })
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def save_test_split(rows: list[dict], path: str) -> str:
    """The test rows as a `save_to_disk` folder in GAP's schema, with the `shape` column (for `gap probe`,
    `gap probe-latents`, `gap diagnose-norms` (its teacher-forced part reads `messages` and `aux_images`) and
    `gap latent-lens`)."""
    import datasets

    features = datasets.Features({
        "images": datasets.List(datasets.Image()), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "aux_images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
            {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
        "shape": datasets.Value("string"),
    })
    datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features).save_to_disk(path)
    return path


# ---- evaluation ----------------------------------------------------------------------------------------------------
def _eval_row(row: dict, oracle: bool = False):
    from trainers.evaluation import EvalRow

    return EvalRow(images=row["images"] + (row["aux_images"] if oracle else []), question=row["question"],
                   answer=row["answer"], choices=None, kind="text")


@torch.no_grad()
def generate_records(model, processor, rows, args, oracle=False, teacher_forced=False, **generate_kwargs):
    """Greedy generation over `rows`: per row the generated text, whether its answer is right, whether a span
    opened, the intent text and whether it is the gold one; plus the summed norms of the fed latents and of the
    visual input embeddings (for the norm ratio). `teacher_forced`: the gold intent and the span (the aux image's
    true targets) are in the prompt; the model writes the rest."""
    from trainers.evaluation import build_prompt, extract_answer, reference_answer

    processor.tokenizer.padding_side = "left"
    start_id = model.config.latent_start_token_id
    records, latent_norm, latent_count, visual_norm, visual_count = [], 0.0, 0, 0.0, 0
    first_spans = []  # per row: the (K, d) latents fed at its first span, or None (for the decodability probe)
    for begin in range(0, len(rows), args.eval_batch_size):
        chunk = rows[begin : begin + args.eval_batch_size]
        evals = [_eval_row(r, oracle) for r in chunk]
        prompts = [build_prompt(processor, e) for e in evals]
        extra = {}
        if teacher_forced:
            prompts = [p + intent_of(r) + " <|latent|>" for p, r in zip(prompts, chunk)]
            extra["aux_images"] = [r["aux_images"] for r in chunk]
        inputs = processor(images=[i for e in evals for i in e.images], text=prompts, padding=True,
                           return_tensors="pt", **extra)
        kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        kwargs.update(generate_kwargs)
        if teacher_forced:
            kwargs["max_latent_spans"] = 0
        out = model.generate(**inputs, return_latents=True, **kwargs)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        texts = processor.batch_decode(new, skip_special_tokens=True)
        for row, e, text, tokens in zip(chunk, evals, texts, new.tolist()):
            intent = text.split("Answer")[0].strip()
            records.append(dict(generated=text, correct=extract_answer(text, "text") == reference_answer(e),
                                span=start_id in tokens, intent=intent, intent_right=intent == intent_of(row)))
        first_spans += [latents[0].float() if latents is not None and len(latents) else None
                        for latents in (out.latents or [None] * len(chunk))]
        for latents in out.latents or []:
            if latents is not None and latents.numel():
                norms = latents.float().norm(dim=-1).flatten()
                latent_norm, latent_count = latent_norm + norms.sum().item(), latent_count + norms.numel()
        if not teacher_forced and not oracle:
            visual = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            norms = torch.cat(list(visual)).float().norm(dim=-1)
            visual_norm, visual_count = visual_norm + norms.sum().item(), visual_count + norms.numel()
    return records, dict(latent_norm=latent_norm, latent_count=latent_count, visual_norm=visual_norm,
                         visual_count=visual_count, first_spans=first_spans)


def evaluate_checkpoint(model, processor, test, kind: str, args, seed: int, log, probe: bool = False) -> dict:
    """Everything measured at one checkpoint of one variant: per-row correctness of every condition; with `probe`
    (latent variants), the linear probe of the crop's colour and shape from the fed latents and from the targets."""
    was_training = model.training
    model.eval()
    rng_state = torch.get_rng_state()  # evaluation must not move the training run's random stream
    try:
        result = {}
        if kind in ("text", "oracle"):
            log("closed loop")
            records, _ = generate_records(model, processor, test, args, oracle=kind == "oracle",
                                          latent_intervention="drop")
            result["closed_loop"] = records
            return result
        log("closed loop")
        records, norms = generate_records(model, processor, test, args)
        first_spans = norms.pop("first_spans")
        result["closed_loop"], result["norms"] = records, norms
        if probe:
            log("linear probe of the latents")
            result["latent_probe"] = probe_checkpoint(model, processor, test, first_spans, seed)
        log("teacher-forced")
        result["teacher_forced"], _ = generate_records(model, processor, test, args, teacher_forced=True)
        for intervention in INTERVENTIONS:
            log(f"intervention {intervention}")
            result[intervention], _ = generate_records(model, processor, test, args, latent_intervention=intervention,
                                                       latent_intervention_seed=seed)
        return result
    finally:
        torch.set_rng_state(rng_state)
        model.train(was_training)


PROBE_LABELS = {"colour": "answer", "shape": "shape"}  # what the probe decodes: the crop's colour and shape
PROBE_MIN_ROWS = 20  # fewer test rows with a span: the held-out intervals would be too wide to say anything


def probe_checkpoint(model, processor, test, first_spans, seed: int) -> dict:
    """`trainers.latent_probe.probe_sources` on the closed-loop latents (`first_spans`) and on the teacher-forced
    targets of the test rows: label -> source -> probe result (per-row held-out correctness kept for pooling)."""
    from trainers.latent_probe import probe_sources, target_latents

    sources = {"closed loop": first_spans,
               "targets": list(target_latents(model, processor, [r["aux_images"][0] for r in test]))}
    labels = {name: [r[column] for r in test] for name, column in PROBE_LABELS.items()}
    return probe_sources(sources, labels, seed=seed, min_rows=PROBE_MIN_ROWS)


# ---- training ------------------------------------------------------------------------------------------------------
def _control_trainer(fill: str, seed: int):
    """A `GapSFTTrainer` whose latent slots receive no evidence in training (the latent loss still trains the head):
    `"zero"`, zeros; `"noise"`, fresh Gaussian noise at the visual embeddings' norm (`latent_head.ema_norm`) for
    every slot, from its own generator seeded by `seed`."""
    from trainers import GapSFTTrainer

    generator = torch.Generator().manual_seed(10_007 + seed)

    class ControlTrainer(GapSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            spans = int((inputs["input_ids"] == self._latent_start_id).sum())
            if spans:
                base = self._gap_model()
                shape = (spans, base.config.num_latent_tokens, base.config.text_config.hidden_size)
                dtype = base.get_input_embeddings().weight.dtype
                if fill == "zero":
                    fed = torch.zeros(shape, dtype=dtype)
                else:
                    fed = torch.randn(shape, generator=generator)
                    fed = fed * (float(base.latent_head.ema_norm) / fed.norm(dim=-1, keepdim=True))
                inputs = dict(inputs)
                inputs["latent_inputs"] = fed.to(dtype=dtype, device=inputs["input_ids"].device)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return ControlTrainer


def train_variant(name: str, rows: list[dict], train_images: list, test: list[dict], args, seed: int, budgets,
                  workdir: str, log, use_latent=None):
    """Train one variant for max(budgets) steps; evaluate at each budget. Returns (model, processor, evaluations,
    final training metrics)."""
    from transformers import PrinterCallback, TrainerCallback

    from modeling_gap import fit_latent_head_pca
    from trainers.tiny import build_tiny_gap
    from trainers import GapSFTConfig, GapSFTTrainer

    kind, feedback, capacity, latent_fill = VARIANTS[name]
    model, processor = build_tiny_gap(seed=seed, latent_feedback=feedback, num_latent_tokens=4)
    fit_latent_head_pca(model, train_images, image_processor=processor.image_processor)
    data = variant_rows(rows, kind, use_latent if capacity else None)
    steps = max(budgets)
    config = GapSFTConfig(
        output_dir=workdir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps,
        weight_decay=0.0, logging_steps=args.logging_steps, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, activation_checkpointing=False, seed=seed, data_seed=seed, capacity_guided=True,
        validate_dataset=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    evaluations, last_logs = {}, {}

    class Checkpoints(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                last_logs.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
                latent = f", latent loss {logs['latent_loss']:.3f}" if "latent_loss" in logs else ""
                log(f"training step {state.global_step}/{steps}, loss {logs['loss']:.3f}{latent}")

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            if state.global_step in budgets:
                evaluations[state.global_step] = evaluate_checkpoint(
                    model, processor, test, kind, args, seed,
                    lambda what: log(f"step {state.global_step}: evaluating {what}"), probe=state.global_step == steps)

    trainer_class = _control_trainer(latent_fill, seed) if latent_fill else GapSFTTrainer
    trainer = trainer_class(model, config, train_dataset=to_dataset(data), processing_class=processor,
                            callbacks=[Checkpoints()])
    trainer.remove_callback(PrinterCallback)  # our one-line status replaces its dict dumps
    trainer.train()
    return model.eval(), processor, evaluations, dict(last_logs, rows_with_span=sum(r["use_latent"] for r in data))


def capacity_from(model, processor, rows, args, seed):
    """use_latent per training row: the text-SFT model's sampled pass rate <= 0.5 (2 samples), and the rates."""
    rates = [0.0] * len(rows)
    state = torch.get_rng_state()
    for sample in range(2):
        torch.manual_seed(seed * 1000 + sample)
        records, _ = generate_records(model, processor, rows, args, latent_intervention="drop", do_sample=True)
        rates = [rate + rec["correct"] / 2 for rate, rec in zip(rates, records)]
    torch.set_rng_state(state)
    return [rate <= 0.5 for rate in rates], rates


# ---- statistics ------------------------------------------------------------------------------------------------------
class Bootstrap:
    """95 % percentile intervals of means over (seeds, rows) arrays: seeds resampled with replacement, then rows
    within each resampled seed. One fixed set of draws serves every statistic (paired differences use the same)."""

    def __init__(self, num_seeds: int, num_rows: int, draws: int = 2000, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.seed_index = rng.integers(0, num_seeds, size=(draws, num_seeds))[..., None]
        self.row_index = rng.integers(0, num_rows, size=(draws, num_seeds, num_rows))

    def interval(self, values):
        import numpy as np

        values = np.asarray(values, dtype=float)
        means = values[self.seed_index, self.row_index].mean(axis=(1, 2))
        low, high = np.percentile(means, [2.5, 97.5])
        return float(values.mean()), float(low), float(high)


def _correct_array(evaluations, seeds, budget, condition):
    rows = [[float(r["correct"]) for r in evaluations[s][budget][condition]] for s in seeds]
    return rows


def summarize(runs: dict, seeds, budgets, bootstrap: Bootstrap) -> list[dict]:
    """One entry per variant and budget: accuracies with intervals, intervention effects (paired), norm ratio."""
    import numpy as np

    summary = []
    for name, run in runs.items():
        evaluations = run["evaluations"]
        for budget in budgets:
            closed = np.array(_correct_array(evaluations, seeds, budget, "closed_loop"))
            entry = dict(variant=name, steps=budget, seeds=list(seeds), test_rows_per_seed=int(closed.shape[1]),
                         rows_with_span=[run["metrics"][s]["rows_with_span"] for s in seeds])
            mean, low, high = bootstrap.interval(closed)
            entry["closed_loop"] = dict(accuracy=mean, ci_low=low, ci_high=high,
                                        per_seed=[float(x) for x in closed.mean(axis=1)])
            records = [r for s in seeds for r in evaluations[s][budget]["closed_loop"]]
            entry["spans_opened"] = sum(r["span"] for r in records) / len(records)
            entry["intent_right"] = sum(r["intent_right"] for r in records) / len(records)
            if "text SFT" in runs and name != "text SFT":
                base = np.array(_correct_array(runs["text SFT"]["evaluations"], seeds, budget, "closed_loop"))
                mean, low, high = bootstrap.interval(closed - base)
                entry["vs_text_sft"] = dict(delta=mean, ci_low=low, ci_high=high)
            if "pca" in runs and name != "pca":
                base = np.array(_correct_array(runs["pca"]["evaluations"], seeds, budget, "closed_loop"))
                mean, low, high = bootstrap.interval(closed - base)
                entry["vs_pca"] = dict(delta=mean, ci_low=low, ci_high=high)
            # per test row and seed, 1 = right, for any later paired comparison
            entry["per_row"] = {condition: ["".join(str(int(r["correct"])) for r in evaluations[s][budget][condition])
                                            for s in seeds]
                                for condition in evaluations[seeds[0]][budget]
                                if condition not in ("norms", "latent_probe")}
            if "teacher_forced" in evaluations[seeds[0]][budget]:
                tf = np.array(_correct_array(evaluations, seeds, budget, "teacher_forced"))
                mean, low, high = bootstrap.interval(tf)
                entry["teacher_forced"] = dict(accuracy=mean, ci_low=low, ci_high=high)
                entry["interventions"] = {}
                for intervention in INTERVENTIONS:
                    values = np.array(_correct_array(evaluations, seeds, budget, intervention))
                    accuracy = float(values.mean())
                    delta, low, high = bootstrap.interval(values - closed)
                    entry["interventions"][intervention] = dict(
                        accuracy=accuracy, delta=delta, ci_low=low, ci_high=high,
                        outside_interval=bool(high < 0 or low > 0))
                norms = [evaluations[s][budget]["norms"] for s in seeds]
                latent_count = sum(n["latent_count"] for n in norms)
                visual = sum(n["visual_norm"] for n in norms) / max(sum(n["visual_count"] for n in norms), 1)
                entry["norm_ratio"] = (sum(n["latent_norm"] for n in norms) / latent_count / visual
                                       if latent_count and visual > 0 else None)
            if "latent_probe" in evaluations[seeds[0]][budget]:
                entry["latent_probe"] = pool_probes([evaluations[s][budget]["latent_probe"] for s in seeds])
            entry["final_training"] = {k: [run["metrics"][s].get(k) for s in seeds]
                                       for k in ("ce_loss", "latent_loss") if any(k in run["metrics"][s] for s in seeds)}
            summary.append(entry)
    return summary


def pool_probes(reports: list[dict]) -> dict:
    """The probe results of several seeds pooled: held-out correct rows summed over seeds, one 95 % Wilson interval
    (rows treated as independent), chance weighted by rows. label -> source -> result."""
    from trainers.latent_probe import accuracy_interval

    pooled = {}
    for label in reports[0]:
        pooled[label] = {}
        for source in reports[0][label]:
            results = [r[label][source] for r in reports]
            rows, without = sum(r["rows"] for r in results), sum(r["rows_without_span"] for r in results)
            if any("latents" not in r for r in results):
                pooled[label][source] = dict(rows=rows, rows_without_span=without,
                                             note=f"fewer than {PROBE_MIN_ROWS} rows with a span in some "
                                                  "seed: not probed")
                continue
            entry = dict(rows=rows, rows_without_span=without,
                         chance=sum(r["chance"] * r["rows"] for r in results) / rows, latents={}, shuffled={})
            for name in results[0]["latents"]:
                entry["latents"][name] = accuracy_interval(sum(r["latents"][name]["correct"] for r in results), rows)
                entry["shuffled"][name] = accuracy_interval(sum(r["shuffled"][name]["correct"] for r in results), rows)
            pooled[label][source] = entry
    return pooled


# ---- writing -------------------------------------------------------------------------------------------------------
def _clean(value):
    """Strict JSON: NaN / inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _ci(entry: dict | None, key="accuracy") -> str:
    if not entry:
        return "-"
    return f"{entry[key]:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def _delta(entry: dict) -> str:
    mark = " *" if entry["ci_high"] < 0 or entry["ci_low"] > 0 else ""
    return f"{entry['delta']:+.3f} [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}]{mark}"


def to_markdown(summary, header: dict, intents: list[dict]) -> str:
    lines = [header["description"], "", "Accuracy (95 % interval across test rows and seeds; change against text SFT "
             "at the same budget, paired; * where its interval excludes 0):", "",
             "| variant | steps | train rows with a span | closed loop | vs text SFT | teacher-forced | test rows "
             "opening a span | intent right | latent / visual-embedding norm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        ratio = e.get("norm_ratio")
        if "interventions" not in e:
            ratio_text = "-"
        elif ratio is None:
            ratio_text = "- (never opened a span)"
        else:
            ratio_text = f"{ratio:.2f}"
        lines.append(
            f"| {e['variant']} | {e['steps']} | {'/'.join(str(n) for n in e['rows_with_span'])} | "
            f"{_ci(e['closed_loop'])} | {_delta(e['vs_text_sft']) if 'vs_text_sft' in e else '-'} | "
            f"{_ci(e.get('teacher_forced'))} | {e['spans_opened']:.2f} | {e['intent_right']:.2f} | {ratio_text} |")
    lines += ["", "Interventions on the fed latents (closed loop): accuracy, and change against no intervention "
              "(paired, 95 % interval; * where it excludes 0):", "",
              "| variant | steps | none | " + " | ".join(INTERVENTIONS) + " |",
              "|---|---|---|" + "---|" * len(INTERVENTIONS)]
    for e in summary:
        if "interventions" not in e:
            continue
        cells = [f"{e['interventions'][i]['accuracy']:.3f} ({_delta(e['interventions'][i])})" for i in INTERVENTIONS]
        lines.append(f"| {e['variant']} | {e['steps']} | {e['closed_loop']['accuracy']:.3f} | " + " | ".join(cells) + " |")
    against_pca = [e for e in summary if "vs_pca" in e]
    if against_pca:
        lines += ["", "Closed loop against pca at the same budget (paired, 95 % interval; * where it excludes 0):", "",
                  "| variant | " + " | ".join(f"{b} steps" for b in dict.fromkeys(e["steps"] for e in against_pca))
                  + " |", "|---|" + "---|" * len(dict.fromkeys(e["steps"] for e in against_pca))]
        for name in dict.fromkeys(e["variant"] for e in against_pca):
            lines.append(f"| {name} | " + " | ".join(_delta(e["vs_pca"]) for e in against_pca if e["variant"] == name)
                         + " |")
    lines += probe_table(summary)
    if intents:
        lines += ["", f"What the models generated (seed {intents[0]['seed']}, {intents[0]['steps']} steps, first test "
                  "rows; the span's latents are not text):", "", "| variant | question | gold intent | generated |",
                  "|---|---|---|---|"]
        for item in intents:
            lines.append(f"| {item['variant']} | {item['question']} | {item['gold']} | {item['generated']} |")
    return "\n".join(lines) + "\n"


def probe_table(summary) -> list[str]:
    """Markdown lines: the linear probe of each latent variant at its probed budget (colour per latent and for the
    whole span, shape for the whole span; shuffled labels; chance)."""
    probed = [e for e in summary if "latent_probe" in e]
    if not probed:
        return []
    names = next((list(r["latents"]) for e in probed for r in e["latent_probe"]["colour"].values() if "latents" in r),
                 [])
    lines = ["", "What a linear probe reads from the latents (held-out accuracy, 95 % interval; logistic regression, "
             "5-fold over the test rows that opened a span, seeds pooled): `closed loop` is what the model fed, "
             "`targets` what teacher forcing feeds (the crop's embeddings), the same for every variant of a seed. "
             "Colour is the answer; the shape is named in the question and the intent text:", "",
             "| variant | steps | latents of | rows (no span) | " + " | ".join(
                 f"colour: latent {n}" if n != "span" else "colour: whole span" for n in names)
             + " | colour, shuffled labels | colour chance | shape: whole span | shape, shuffled labels |",
             "|---|---|---|---|" + "---|" * (len(names) + 4)]
    for e in probed:
        for source, colour in e["latent_probe"]["colour"].items():
            shape = e["latent_probe"]["shape"][source]
            head = f"| {e['variant']} | {e['steps']} | {source} | {colour['rows']} ({colour['rows_without_span']}) | "
            if "latents" not in colour or "latents" not in shape:
                lines.append(head + f"{colour.get('note') or shape.get('note')} |")
                continue
            cells = [_ci(colour["latents"][n]) for n in names] + [
                _ci(colour["shuffled"]["span"]), f"{colour['chance']:.2f}", _ci(shape["latents"]["span"]),
                _ci(shape["shuffled"]["span"])]
            lines.append(head + " | ".join(cells) + " |")
    return lines


def plot(summary, path: str, chance: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(e["variant"] for e in summary))
    for n, name in enumerate(names):
        entries = [e for e in summary if e["variant"] == name]
        shift = 2 ** (0.06 * (n - (len(names) - 1) / 2))  # side by side, so that the intervals stay readable
        x = [e["steps"] * shift for e in entries]
        y = [e["closed_loop"]["accuracy"] for e in entries]
        err = [[v - e["closed_loop"]["ci_low"] for v, e in zip(y, entries)],
               [e["closed_loop"]["ci_high"] - v for v, e in zip(y, entries)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    steps = sorted({e["steps"] for e in summary})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.set_xlabel("training steps")
    ax.set_ylabel("closed-loop accuracy (95 % interval)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the norm diagnosis and latent lens (trainers.diagnostics) ----------------------------------------------------
def diagnose_and_draw(model, processor, rows, args):
    """The norm diagnosis on the test rows (norms.png, norms.json: closed loop per feedback mode and teacher-forced,
    where the latents are fed) and the latent lens on three rows (lens_*.png)."""
    from trainers.diagnostics import diagnose, draw_lens, latent_similarity_maps, plot_norms
    from trainers.evaluation import reference_answer
    from trainers.outputs import write_json

    output_dir = args.output_dir
    diagnosis = diagnose(model, processor, [_eval_row(r) for r in rows], batch_size=args.eval_batch_size,
                         dataset_rows=rows, max_new_tokens=args.max_new_tokens)
    write_json(os.path.join(output_dir, "norms.json"), diagnosis)
    plot_norms(diagnosis, os.path.join(output_dir, "norms.png"),
               title=f"tiny GAP, pca variant, {len(rows)} test rows (demo)")
    for i, row in enumerate([_eval_row(r) for r in rows[:3]]):
        maps, text = latent_similarity_maps(model, processor, row, max_new_tokens=60)
        draw_lens(row.images[0].convert("RGB"), maps, os.path.join(output_dir, f"lens_{i}.png"),
                  title=f"generated: {text[:60]}\ngold answer: {reference_answer(row)}")
    return diagnosis


# ---- the run -------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="store_true",
                        help=f"the full study: seeds {STUDY['seeds']}, budgets {STUDY['budgets']}, every variant, "
                             f"{STUDY['test_rows']} test rows per seed (default: the demo slice, seeds "
                             f"{DEMO_SLICE['seeds']}, budgets {DEMO_SLICE['budgets']}, variants "
                             f"{DEMO_SLICE['variants']}, {DEMO_SLICE['test_rows']} test rows)")
    parser.add_argument("--output_dir", default=None, help="default outputs/demo, or outputs/demo-study with --study")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="training steps at which to evaluate")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), metavar="VARIANT",
                        help=f"any of {list(VARIANTS)}")
    parser.add_argument("--intent", default="name", choices=["name", "position"],
                        help="the text before the span: 'Find the triangle.' (name, default: the model can always "
                             "produce it from the question) or 'The triangle is in row 2, column 3.' (position: from "
                             "the question and the image)")
    parser.add_argument("--train_rows", type=int, default=2048)
    parser.add_argument("--test_rows", type=int, default=None, help="test rows per seed")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--eval_batch_size", type=int, default=200)
    parser.add_argument("--max_new_tokens", type=int, default=56)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible, and fastest "
                                                                 "on a shared machine)")
    parser.add_argument("--no_save", action="store_true", help="do not save the pca checkpoint / test split / lens")
    args = parser.parse_args(argv)
    preset = STUDY if args.study else DEMO_SLICE
    args.seeds = args.seeds or list(preset["seeds"])
    args.budgets = sorted(set(args.budgets or preset["budgets"]))
    args.variants = args.variants or list(preset["variants"])
    args.test_rows = args.test_rows or preset["test_rows"]
    if any(VARIANTS[v][0] == "latent" and VARIANTS[v][2] for v in args.variants) and \
            "text SFT" not in args.variants:
        args.variants = ["text SFT"] + args.variants  # capacity needs the text-SFT model of the seed
    args.variants = sorted(args.variants, key=list(VARIANTS).index)
    args.output_dir = args.output_dir or ("outputs/demo-study" if args.study else "outputs/demo")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    command = "python recipes/demo.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    scope = ("the full study" if args.study else
             "a small slice of the study, to stay within a few minutes (use --study for every variant, seed and "
             "budget)")
    print(f"GAP demo: {scope}: seeds {args.seeds}, budgets {args.budgets} steps, {len(args.variants)} variants, "
          f"{args.train_rows} training / {args.test_rows} test rows per seed, {args.threads} thread(s).", flush=True)
    work = tempfile.mkdtemp(prefix="gap-demo-")
    runs = {name: dict(evaluations={}, metrics={}) for name in args.variants}
    keep = {}
    for seed in args.seeds:
        train, test = make_splits(args.train_rows, args.test_rows, seed, intent=args.intent)
        images = [image for row in train[:256] for image in row["images"] + row["aux_images"]]
        use_latent = None
        for n, name in enumerate(args.variants):
            def log(message, name=name, n=n, seed=seed):
                print(f"[{time.perf_counter() - start:6.0f} s] seed {seed} | {name} ({n + 1}/{len(args.variants)}) | "
                      f"{message}", flush=True)

            log(f"training {max(args.budgets)} steps")
            model, processor, evaluations, metrics = train_variant(
                name, train, images, test, args, seed, args.budgets, work, log, use_latent)
            runs[name]["evaluations"][seed], runs[name]["metrics"][seed] = evaluations, metrics
            final = evaluations[max(args.budgets)]["closed_loop"]
            log(f"done: closed loop at {max(args.budgets)} steps {sum(r['correct'] for r in final) / len(final):.3f}")
            if name == "text SFT":
                use_latent, _ = capacity_from(model, processor, train, args, seed)
                log(f"capacity: {sum(use_latent)} of {len(train)} training rows keep their span")
            if seed == args.seeds[0]:
                keep["test"] = test
                keep[name] = (model, processor) if name == "pca" else None
                keep.setdefault("intents", []).extend(
                    dict(variant=name, seed=seed, steps=max(args.budgets), question=r["question"], gold=intent_of(r),
                         generated=rec["generated"]) for r, rec in zip(test[:3], final))
            del model
        if seed == args.seeds[0] and keep.get("pca") and not args.no_save:
            save_pca_and_diagnose(keep, args)
        done = args.seeds[: args.seeds.index(seed) + 1]
        if done != args.seeds:
            write_results(runs, args, done, keep, command, time.perf_counter() - start)
            print(f"[{time.perf_counter() - start:6.0f} s] seeds {done} done: partial results written", flush=True)
    result = write_results(runs, args, args.seeds, keep, command, time.perf_counter() - start)
    print("\n" + result["markdown"])
    print(f"written to {args.output_dir}: results.md, results.json, accuracy.png, latent_probe.png"
          + (", pca-checkpoint/, test-data/, norms.png, norms.json, lens_*.png" if keep.get("commands") else ""))
    if not args.study:
        print(f"This was {scope}; it took {result['seconds']:.0f} s.")
    if keep.get("commands"):
        print("Probe, latent-probe, norm-diagnosis and latent-lens commands for the saved pca checkpoint:")
    for line in keep.get("commands", []):
        print("  " + line)
    return result


def save_pca_and_diagnose(keep: dict, args) -> None:
    """Save the first seed's pca model (save_pretrained) and its test split; norm diagnosis and latent lens on it."""
    model, processor = keep["pca"]
    checkpoint = os.path.join(args.output_dir, "pca-checkpoint")
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    data = save_test_split(keep["test"], os.path.join(args.output_dir, "test-data"))
    keep["diagnosis"] = diagnose_and_draw(model, processor, keep["test"], args)
    keep["commands"] = [
        f"gap probe --model_name_or_path {checkpoint} --dataset_name {data} "
        f"--max_new_tokens {args.max_new_tokens} --output_dir {os.path.join(args.output_dir, 'probe')}",
        f"gap probe-latents --model_name_or_path {checkpoint} --dataset_name {data} --label_columns answer shape "
        f"--max_new_tokens {args.max_new_tokens} --output_dir {os.path.join(args.output_dir, 'latent-probe')}",
        f"gap diagnose-norms --model_name_or_path {checkpoint} --dataset_name {data} "
        f"--max_new_tokens {args.max_new_tokens} --output_dir {os.path.join(args.output_dir, 'norms')}",
        f"gap latent-lens --model_name_or_path {checkpoint} --dataset_name {data} --limit 4 "
        f"--output_dir {os.path.join(args.output_dir, 'lens')}",
    ]


def write_results(runs: dict, args, seeds: list[int], keep: dict, command: str, seconds: float) -> dict:
    """results.md, results.json (strict) and accuracy.png over the seeds done so far."""
    bootstrap = Bootstrap(len(seeds), args.test_rows)
    summary = summarize(runs, seeds, args.budgets, bootstrap)
    chance = 1 / TASK["num_colors"]
    partial = "" if list(seeds) == list(args.seeds) else f" PARTIAL: seeds {seeds} of {args.seeds} done."
    description = (
        f"Named-shape task (3x3 board, 4 shapes, 4 colours: chance {chance:.2f}; intent text: {args.intent}), "
        f"{args.train_rows} training and {args.test_rows} disjoint test boards per seed; tiny Qwen2.5-VL (width 64, "
        f"2 layers, K = 4), batch {args.batch_size}, learning rate {args.learning_rate} (constant after "
        f"{args.warmup_steps} warm-up steps); seeds {seeds}; budgets {args.budgets} steps, each a checkpoint of one "
        f"run per variant and seed. `{command}` ({args.threads} thread(s)), {seconds:.0f} s on this machine."
        + partial)
    markdown = to_markdown(summary, dict(description=description), keep.get("intents", []))
    diagnosis = keep.get("diagnosis")
    if diagnosis:
        from trainers.diagnostics import norms_summary_line

        markdown += (f"\nNorm diagnosis (pca, seed {args.seeds[0]}, {max(args.budgets)} steps, the test rows; "
                     f"norms.png): {norms_summary_line(diagnosis)}.\n")
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(markdown)
    result = dict(chance=chance, task=TASK, arguments=dict(vars(args)), command=command, seconds=seconds,
                  seeds_done=list(seeds), summary=summary, intents=keep.get("intents", []), diagnosis=diagnosis)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        f.write(json.dumps(_clean(result), indent=1, allow_nan=False))
    plot(summary, os.path.join(args.output_dir, "accuracy.png"), chance,
         f"named-shape task, seeds {seeds}, {args.test_rows} test rows per seed")
    probed = [e for e in summary if "latent_probe" in e]
    if probed:
        from trainers.latent_probe import plot_probe

        report = {label: {f"{e['variant']} ({e['steps']} steps)": e["latent_probe"][label]["closed loop"]
                          for e in probed} for label in PROBE_LABELS}
        plot_probe(report, os.path.join(args.output_dir, "latent_probe.png"),
                   title=f"linear probe of the fed latents (closed loop), seeds {seeds}")
    return dict(result, markdown=markdown)


__all__ = ["VARIANTS", "Bootstrap", "SplitOverlapError", "check_disjoint", "main", "make_splits", "summarize"]
