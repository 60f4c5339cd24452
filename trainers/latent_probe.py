"""What the latents carry: a linear decodability probe on the latents a GAP model feeds (`gap probe-latents`).

Interventions (`gap probe`) show that a model *uses* its latents; this shows what is *in* them. For each test row the
latents fed at the first span of closed-loop generation are collected (rows that open no span are counted and left
out); a multinomial logistic regression (L2, features standardised on the training folds) is fitted from each latent
of the span, and from the whole span (its K latents concatenated), to a property of the row, with k-fold
cross-validation over rows: every row is predicted by a probe that never saw it. Accuracy comes with a 95 % Wilson
interval (the package's accuracy metric), against

- chance: the share of the most frequent label among the probed rows (what a constant guess scores);
- the same probe on shuffled labels (the rows' labels permuted once): what a probe of this size reads from nothing;
- the same probe on the latents of control models (`--control_models`, e.g. a model trained with noise at the
  latent slots), on the same rows;
- the teacher-forced targets for reference (what the span stands for: the row's aux image through the model's own
  vision tower, pooled to K and, for `pca`, projected onto the head's subspace), when the rows have `aux_images`.

Properties: any dataset column (`--label_columns`), its values as strings; on the synthetic tasks, `answer` is the
colour of the crop and (named-shape task) `shape` its shape. Writes `latent_probe.json` (strict), `latent_probe.md`
and `latent_probe.png`.
"""

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch

from .arguments import EvalArguments
from .evaluation import METRIC_PATH, build_prompt, load_eval_model, standardize_row
from .outputs import write_json

SPAN = "span"  # the probe on the whole span (K latents concatenated)


@dataclass
class LatentProbeArguments(EvalArguments):
    """`gap probe-latents`: the fields of `gap eval` plus the probe's."""

    label_columns: list[str] = field(
        default_factory=lambda: ["answer"],
        metadata={"help": "Dataset columns to decode from the latents (the named-shape task: answer shape)."})
    control_models: list[str] = field(
        default_factory=list,
        metadata={"help": "Checkpoints whose latents get the same probe on the same rows (e.g. a noise control)."})
    probe_folds: int = field(default=5, metadata={"help": "Cross-validation folds over rows (held-out rows)."})
    probe_l2: float = field(default=1e-2, metadata={"help": "L2 penalty of the logistic regression."})
    probe_seed: int = field(default=0, metadata={"help": "Seed of the fold split and of the label shuffle."})
    output_dir: str = field(default="outputs/latent_probe", metadata={"help": "Where the JSON, table and PNG go."})

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        if self.probe_folds < 2:
            raise ValueError(f"--probe_folds must be >= 2 (held-out rows need a split); got {self.probe_folds}.")
        if self.probe_l2 < 0:
            raise ValueError(f"--probe_l2 must be >= 0; got {self.probe_l2}.")


# ---- the probe -------------------------------------------------------------------------------------------------------
def fit_logistic_regression(features: torch.Tensor, labels: torch.LongTensor, num_classes: int, l2: float = 1e-2,
                            max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on (n, f) float64 `features` and (n,) `labels`: `(weight (f, C), bias (C,))`
    minimising the mean cross-entropy + `l2` / 2 * ||weight||^2 (L-BFGS, deterministic)."""
    weight = torch.zeros(features.shape[1], num_classes, dtype=features.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def held_out_predictions(features: torch.Tensor, labels: torch.LongTensor, num_classes: int, folds: int = 5,
                         seed: int = 0, l2: float = 1e-2) -> torch.LongTensor:
    """(n,) predictions of (n, f) `features`, each row predicted by a probe fitted on the other folds (rows split
    into `folds` by a permutation seeded with `seed`; features standardised with the training folds' statistics)."""
    n = features.shape[0]
    features = features.double()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    predictions = torch.empty(n, dtype=torch.long)
    with _one_thread():
        for held in order.chunk(min(folds, n)):
            train = torch.ones(n, dtype=torch.bool)
            train[held] = False
            mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-8)
            weight, bias = fit_logistic_regression((features[train] - mean) / std, labels[train], num_classes, l2)
            predictions[held] = (((features[held] - mean) / std) @ weight + bias).argmax(-1)
    return predictions


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread, then as it was: the probe's problems are small, and on a busy CPU the hand-offs between
    threads cost far more than they save (measured 30x slower with 2 threads on this repository's loaded 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _accuracy_metric():
    import evaluate

    return evaluate.load(METRIC_PATH)


def accuracy_interval(correct: int, total: int) -> dict:
    """Accuracy with its 95 % Wilson interval, from the package's accuracy metric (`trainers/metrics/gap_accuracy`)."""
    return _accuracy_metric().compute(predictions=["1"] * correct + ["0"] * (total - correct), references=["1"] * total)


def encode_labels(values: list) -> tuple[torch.LongTensor, list[str]]:
    """Row values -> (n,) class indices and the class names (values as strings, sorted)."""
    names = [str(v) for v in values]
    classes = sorted(set(names))
    return torch.tensor([classes.index(v) for v in names]), classes


def probe_latents(latents: torch.Tensor, labels: list, folds: int = 5, seed: int = 0, l2: float = 1e-2,
                  shuffled: bool = True) -> dict:
    """The probe on (n, K, d) `latents` (one span per row) against the rows' `labels`: per latent index and for the
    whole span, held-out accuracy with its interval; with `shuffled`, the same on labels permuted once (seed
    `seed`); the chance level (most frequent label's share), the rows and the classes."""
    targets, classes = encode_labels(labels)
    if len(classes) < 2:
        raise ValueError(f"the label has a single value ({classes[0]!r}) over the {len(labels)} probed rows: nothing "
                         "to decode; name another column with --label_columns.")
    permuted = targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed + 1))]
    features = {str(k): latents[:, k] for k in range(latents.shape[1])}
    features[SPAN] = latents.flatten(1)
    result = dict(rows=len(targets), classes=classes,
                  chance=float(torch.bincount(targets).max()) / len(targets), latents={}, shuffled={})
    for name, x in features.items():
        predicted = held_out_predictions(x.float(), targets, len(classes), folds, seed, l2)
        result["latents"][name] = dict(accuracy_interval(int((predicted == targets).sum()), len(targets)),
                                       correct_rows=(predicted == targets).tolist())
        if shuffled:
            predicted = held_out_predictions(x.float(), permuted, len(classes), folds, seed, l2)
            result["shuffled"][name] = accuracy_interval(int((predicted == permuted).sum()), len(targets))
    return result


# ---- collecting the latents ------------------------------------------------------------------------------------------
@torch.no_grad()
def fed_latents(model, processor, rows, batch_size: int = 8, max_new_tokens: int = 64, **generate_kwargs):
    """Closed loop: per EvalRow the latents fed at its first closed span, a (K, d) float tensor, or None where the
    model opened no span (greedy unless `generate_kwargs` say otherwise)."""
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    generate_kwargs.setdefault("do_sample", False)
    found = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        inputs = processor(images=[i.convert("RGB") for r in chunk for i in r.images],
                           text=[build_prompt(processor, r) for r in chunk], padding=True,
                           return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, return_latents=True, **generate_kwargs)
        found += [latents[0].float().cpu() if latents is not None and len(latents) else None for latents in out.latents]
    return found


@torch.no_grad()
def target_latents(model, processor, aux_images: list, batch_size: int = 16) -> torch.Tensor:
    """Teacher forcing: (n, K, d) what the slots of a span standing for each aux image receive in training (the
    model's own visual embeddings of the image, pooled to K; projected onto the head's subspace for `pca`)."""
    device = next(model.parameters()).device
    parts = []
    for begin in range(0, len(aux_images), batch_size):
        batch = processor.image_processor(images=[i.convert("RGB") for i in aux_images[begin : begin + batch_size]],
                                          return_tensors="pt")
        targets = model.encode_latent_targets(batch["pixel_values"].to(device, model.dtype),
                                              batch["image_grid_thw"].to(device))
        parts.append(model.latent_head.teacher_inputs(targets, model.config.latent_feedback).float().cpu())
    return torch.cat(parts)


def probe_sources(sources: dict, labels: dict, folds: int = 5, seed: int = 0, l2: float = 1e-2,
                  min_rows: int | None = None) -> dict:
    """`sources`: name -> per-row (K, d) latents or None (rows without a span are left out of that source);
    `labels`: column -> per-row values. Returns column -> source -> `probe_latents` result (plus `rows_without_span`).
    The shuffled-label probe runs on every source. A source with fewer than `min_rows` rows (default: `folds`) is
    reported, not probed."""
    min_rows = max(min_rows or folds, folds)
    report = {}
    for column, values in labels.items():
        report[column] = {}
        for name, per_row in sources.items():
            kept = [i for i, latents in enumerate(per_row) if latents is not None]
            if len(kept) < min_rows:
                report[column][name] = dict(rows=len(kept), rows_without_span=len(per_row) - len(kept),
                                            note=f"{len(kept)} rows with a span: too few to probe (< {min_rows})")
                continue
            latents = torch.stack([per_row[i] for i in kept])
            result = probe_latents(latents, [values[i] for i in kept], folds, seed, l2)
            report[column][name] = dict(result, rows_without_span=len(per_row) - len(kept))
    return report


# ---- writing ---------------------------------------------------------------------------------------------------------
def _cell(entry: dict) -> str:
    return f"{entry['accuracy']:.2f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]"


def probe_markdown(report: dict) -> str:
    """One table per label column: rows are the probed sources (and shuffled labels), columns the latent indices and
    the whole span."""
    lines = []
    for column, by_source in report.items():
        probed = [r for r in by_source.values() if "latents" in r]
        names = list(probed[0]["latents"]) if probed else []
        lines += [f"Linear probe of `{column}` (held-out accuracy, 95 % interval; chance = most frequent label):", "",
                  "| latents of | rows (no span) | chance | " + " | ".join(
                      f"latent {n}" if n != SPAN else "whole span" for n in names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for source, result in by_source.items():
            if "latents" not in result:
                lines.append(f"| {source} | {result['rows']} ({result['rows_without_span']}) | - | {result['note']} |")
                continue
            cells = [_cell(result["latents"][n]) for n in names]
            lines.append(f"| {source} | {result['rows']} ({result['rows_without_span']}) | {result['chance']:.2f} | "
                         + " | ".join(cells) + " |")
            if result.get("shuffled"):
                cells = [_cell(result["shuffled"][n]) for n in names]
                lines.append(f"| {source}, shuffled labels | {result['rows']} | {result['chance']:.2f} | "
                             + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_probe(report: dict, path: str, title: str = "") -> None:
    """latent_probe.png: one panel per label column; held-out accuracy (95 % interval) per latent index and for the
    whole span, one colour per source, dotted for its shuffled labels, dashed for its chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(report)
    width = max(len(r) for r in report.values())
    fig, axes = plt.subplots(1, len(columns), figsize=(5.4 * len(columns), 4.4 + 0.25 * width), squeeze=False)
    for ax, column in zip(axes[0], columns):
        probed = {s: r for s, r in report[column].items() if "latents" in r}
        for n, (source, result) in enumerate(probed.items()):
            names = list(result["latents"])
            x = [i + 0.06 * (n - (len(probed) - 1) / 2) for i in range(len(names))]
            color = f"C{n}"
            for key, style in (("latents", "-"), ("shuffled", ":")):
                if not result.get(key):
                    continue
                entries = [result[key][name] for name in names]
                y = [e["accuracy"] for e in entries]
                err = [[max(a - e["ci_low"], 0) for a, e in zip(y, entries)],  # (rounding at 0 and 1)
                       [max(e["ci_high"] - a, 0) for a, e in zip(y, entries)]]
                ax.errorbar(x, y, yerr=err, marker="o" if key == "latents" else "x", capsize=3, linestyle=style,
                            color=color, alpha=1.0 if key == "latents" else 0.6,
                            label=source + (", shuffled labels" if key == "shuffled" else ""))
            ax.axhline(result["chance"], color=color, linewidth=0.8, linestyle="--", alpha=0.5)
        if probed:
            names = list(next(iter(probed.values()))["latents"])
            ax.set_xticks(range(len(names)), [f"latent {n}" if n != SPAN else "whole span" for n in names],
                          fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("held-out accuracy (95 % interval)")
        ax.set_title(f"decoding `{column}` from the latents (dashed: chance)", fontsize=9)
        if probed:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
        else:
            ax.text(0.5, 0.5, "too few rows opened a span: nothing to probe", ha="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_latent_probe(args: LatentProbeArguments) -> dict:
    """`gap probe-latents`: writes `latent_probe.json`, `latent_probe.md` and `latent_probe.png` to
    `args.output_dir`; returns the report."""
    from .dataset_loader import load_split
    from .model_loader import load_model

    split = load_split(args.dataset_name, args.dataset_split, args.dataset_config)
    if args.limit:
        split = split.select(range(min(args.limit, len(split))))
    missing = [c for c in args.label_columns if c not in split.column_names]
    if missing:
        raise KeyError(f"label column(s) {missing} are not in {args.dataset_name} (columns: {split.column_names}): "
                       "name existing ones with --label_columns.")
    model, processor = load_eval_model(args)
    if getattr(model.config, "latent_start_token_id", None) is None:
        raise ValueError(f"{args.model_name_or_path} is not a GAP model: it feeds no latents to probe.")
    rows = [standardize_row(row, args.column_mapping, index=i) for i, row in enumerate(split)]
    labels = {c: split[c] for c in args.label_columns}
    generation = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    sources = {"closed loop": fed_latents(model, processor, rows, **generation)}
    if "aux_images" in split.column_names:
        aux = split["aux_images"]
        if all(images for images in aux):
            sources["targets (teacher-forced)"] = list(target_latents(model, processor, [a[0] for a in aux]))
    for path in args.control_models:
        control, control_processor = load_model(path, stock="keep", trust_remote_code=args.trust_remote_code,
                                                allow_pickle_weights=args.allow_pickle_weights)
        sources[f"control {os.path.basename(os.path.normpath(path))}"] = fed_latents(
            control.eval(), control_processor, rows, **generation)
    report = probe_sources(sources, labels, args.probe_folds, args.probe_seed, args.probe_l2)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "latent_probe.json"),
               dict(model=str(args.model_name_or_path), dataset=str(args.dataset_name), rows=len(rows),
                    folds=args.probe_folds, l2=args.probe_l2, seed=args.probe_seed, probes=_without_rows(report)))
    markdown = probe_markdown(report)
    with open(os.path.join(args.output_dir, "latent_probe.md"), "w") as f:
        f.write(markdown)
    plot_probe(report, os.path.join(args.output_dir, "latent_probe.png"),
               title=os.path.basename(os.path.normpath(str(args.model_name_or_path))))
    print(markdown)
    return report


def _without_rows(report: dict) -> dict:
    """The report without the per-row correctness lists (kept in memory for paired comparisons, not written)."""
    return {column: {source: {k: ({n: {kk: vv for kk, vv in e.items() if kk != "correct_rows"} for n, e in v.items()}
                                  if k == "latents" else v) for k, v in result.items()}
                     for source, result in by_source.items()} for column, by_source in report.items()}


__all__ = [
    "LatentProbeArguments",
    "fed_latents",
    "fit_logistic_regression",
    "held_out_predictions",
    "plot_probe",
    "probe_latents",
    "probe_markdown",
    "probe_sources",
    "run_latent_probe",
    "target_latents",
]
