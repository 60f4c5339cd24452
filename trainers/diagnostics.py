"""Diagnostics of a GAP (or stock Qwen2.5-VL) checkpoint: intervention probing, the norm diagnosis, the latent lens
(`gap probe`, `gap diagnose-norms`, `gap latent-lens`). What the latents carry (a linear decodability probe, `gap
probe-latents`) is in `trainers.latent_probe`.

- Probing: accuracy under each intervention on the fed latents (`LATENT_INTERVENTIONS`: zeros; Gaussian noise at each
  latent's norm; a fixed permutation of the coordinates; the mean visual embedding; no span at all) and its change
  against none. If perturbing the latents costs accuracy, they carry task-relevant signal beyond extra token slots.
- Norms (the paper's diagnosis), measured where the latents are fed: per feedback mode, the latents `generate`
  fed at every slot (closed loop) and the hidden states it mapped them from; teacher-forced, the state before each
  latent slot of dataset rows mapped by each mode's head; all against the visual input embeddings' norm, as
  distributions. Per layer, the mean hidden-state norm at text and at image positions against the input embeddings'
  (on Monet-7B the final text states are ~546x their input embeddings, the vision states ~8.7x) and at the states
  the latents are mapped from; layer 0 is the input embeddings, the last layer is after the final norm (the state
  Monet-style models feed back).
- Latent lens: the cosine similarity of every generated latent to the visual tokens of the row's first image, on
  its token grid, overlaid on the image.
"""

import json
import math
import os

import torch
import torch.nn.functional as F

from modeling_gap.configuration_gap import LATENT_INTERVENTIONS

from .evaluation import (
    build_prompt,
    evaluate_rows,
    load_eval_model,
    load_eval_rows,
    reference_answer,
    standardize_row,
)
from .outputs import write_json

NORMS_NO_SPAN_NOTE = ("the model never opened a latent span on these rows in closed loop, so nothing was fed to "
                      "measure there; the teacher-forced figures (rows with `messages` and `aux_images`) still apply")
NO_SPAN_NOTE = ("the model never opened a latent span on these rows, so the interventions have nothing to act on: "
                "train it with latent supervision first (e.g. `make demo` saves a pca checkpoint that does)")


# ---- probing ---------------------------------------------------------------------------------------------------------
def probe(model, processor, rows, args, progress: bool = True) -> list[dict]:
    """One evaluation per intervention; each entry: intervention, accuracy, interval, change vs none, spans."""
    table = []
    for intervention in LATENT_INTERVENTIONS:
        results, _ = evaluate_rows(
            model, processor, rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            latent_feedback=args.latent_feedback, latent_intervention=intervention,
            latent_intervention_seed=args.latent_intervention_seed, cache_implementation=args.cache_implementation,
            progress=progress,
        )
        table.append(dict(intervention=intervention or "none", **results))
    for entry in table:
        entry["delta_vs_none"] = entry["accuracy"] - table[0]["accuracy"]
    return table


def probe_markdown(table: list[dict]) -> str:
    lines = ["| intervention | accuracy | 95% CI | change vs none | latent spans / row |", "|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['intervention']} | {e['accuracy']:.3f} | {e['ci_low']:.3f}-{e['ci_high']:.3f} | "
                     f"{e['delta_vs_none']:+.3f} | {e['mean_latent_spans']:.2f} |")
    if table and table[0]["mean_latent_spans"] == 0:
        lines.append(f"\nNote: {NO_SPAN_NOTE}.")
    return "\n".join(lines) + "\n"


def run_probe(args) -> list[dict]:
    """`gap probe`: writes `probe.md` and `probe.json` to `args.output_dir`."""
    model, processor = load_eval_model(args)
    if getattr(model.config, "latent_start_token_id", None) is None:
        raise ValueError(f"{args.model_name_or_path} is not a GAP model: it has no latents to probe.")
    table = probe(model, processor, load_eval_rows(args), args)
    os.makedirs(args.output_dir, exist_ok=True)
    markdown = probe_markdown(table)
    with open(os.path.join(args.output_dir, "probe.md"), "w") as f:
        f.write(markdown)
    write_json(os.path.join(args.output_dir, "probe.json"), table)
    print(markdown)
    return table


# ---- norms -----------------------------------------------------------------------------------------------------------
FEEDBACK_MODES = ("raw", "ema_norm", "pca")


MAX_LISTED_NORMS = 10_000  # values kept per distribution in norms.json / the violins (evenly strided beyond)


def _norm_summary(norms: torch.Tensor, scale: float) -> dict:
    """Mean and quantiles of (n,) norms (all of them), `ratio` = mean / `scale` (the mean visual input-embedding
    norm), and the values over `scale` (`ratios`, at most `MAX_LISTED_NORMS`, evenly strided)."""
    norms = norms.float().flatten()
    if norms.numel() == 0:
        return dict(count=0)
    q = torch.quantile(norms, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
    listed = norms[:: -(-norms.numel() // MAX_LISTED_NORMS)]
    return dict(count=norms.numel(), mean=norms.mean().item(), q05=q[0].item(), q25=q[1].item(), median=q[2].item(),
                q75=q[3].item(), q95=q[4].item(), ratio=norms.mean().item() / scale,
                ratios=(listed / scale).tolist())


@torch.no_grad()
def layer_norms(model, processor, rows, batch_size: int = 8) -> dict:
    """Per layer, the mean hidden-state norm at text and at image positions of the prompts of `rows` (EvalRows),
    their ratios to layer 0 (the input embeddings), and the norms of the visual input embeddings (per token)."""
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    sums, visual = None, []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        inputs = processor(images=[i.convert("RGB") for r in chunk for i in r.images],
                           text=[build_prompt(processor, r) for r in chunk], padding=True, return_tensors="pt").to(device)
        outputs = model.model(**inputs, output_hidden_states=True)
        real = inputs["attention_mask"].bool()
        image = (inputs["input_ids"] == model.config.image_token_id) & real
        text = real & ~image
        norms = torch.stack(outputs.hidden_states).float().norm(dim=-1)  # (layers + 1, B, L)
        batch_sums = torch.stack([
            (norms * text).sum((1, 2)), text.sum().expand(norms.shape[0]).float(),
            (norms * image).sum((1, 2)), image.sum().expand(norms.shape[0]).float(),
        ])
        sums = batch_sums if sums is None else sums + batch_sums
        visual.append(norms[0][image].cpu())
    text_mean, image_mean = (sums[0] / sums[1]).tolist(), (sums[2] / sums[3]).tolist()
    return dict(layers=list(range(len(text_mean))), text_norm=text_mean, image_norm=image_mean,
                text_ratio=[n / text_mean[0] for n in text_mean], image_ratio=[n / image_mean[0] for n in image_mean],
                visual_norms=torch.cat(visual))


@torch.no_grad()
def teacher_forced_states(model, processor, rows, batch_size: int = 8) -> dict:
    """Teacher forcing on dataset rows in GAP's schema (every span kept): the hidden states, every layer, at the
    position before each latent slot (the state the head maps to feed that slot) `states` (layers + 1, n, d), and
    the targets fed at the slots `fed_targets` (n, d) (projected onto the head's subspace for `pca`)."""
    from .collator import GapDataCollator

    collator = GapDataCollator(processor, capacity_guided=False)
    device = next(model.parameters()).device
    states, fed = [], []
    for begin in range(0, len(rows), batch_size):
        batch = collator(rows[begin : begin + batch_size])
        batch.pop("labels", None)
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = model(**batch, output_hidden_states=True)
        if outputs.latent_targets is None:
            continue
        slots = model.latent_slot_mask(batch["input_ids"])
        before = torch.roll(slots, shifts=-1, dims=1)  # the state at p - 1 feeds slot p, in training as in generate
        layers = list(outputs.hidden_states[:-1]) + [outputs.last_hidden_state]
        states.append(torch.stack([layer[before] for layer in layers]).float().cpu())
        targets = outputs.latent_targets.flatten(0, 1)
        fed.append(model.latent_head.teacher_inputs(targets, model.config.latent_feedback).float().cpu())
    if not states:
        return dict(states=None, fed_targets=None)
    return dict(states=torch.cat(states, dim=1), fed_targets=torch.cat(fed))


def closed_span_slots(tokens: list[int], pad_id: int, start_id: int, end_id: int) -> list[int]:
    """Indices in `tokens` (generated ids) of the latent slots of every closed span (start, slots, end)."""
    slots, i = [], 0
    while i < len(tokens):
        if tokens[i] == start_id:
            j = i + 1
            while j < len(tokens) and tokens[j] == pad_id:
                j += 1
            if j < len(tokens) and tokens[j] == end_id and j > i + 1:
                slots += list(range(i + 1, j))
            i = j
        else:
            i += 1
    return slots


@torch.no_grad()
def closed_loop_states(model, processor, rows, feedback: str, batch_size: int = 8, max_new_tokens: int = 64) -> dict:
    """Greedy closed-loop generation with `feedback`: at every slot of a closed span, the hidden states (every layer)
    `generate` computed the fed latent from, `states` (layers + 1, n, d), and what it fed, `fed` (n, d) (from the
    output's `latents`); `rows_with_span`, `spans`. A head whose `ema_norm` is calibrated by this call (never set
    before) is put back as it was."""
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    pad_id, start_id, end_id = model.config.latent_token_ids
    ema_norm = model.latent_head.ema_norm.clone()
    states, fed, rows_with_span, spans = [], [], 0, 0
    try:
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin : begin + batch_size]
            inputs = processor(images=[i.convert("RGB") for r in chunk for i in r.images],
                               text=[build_prompt(processor, r) for r in chunk], padding=True,
                               return_tensors="pt").to(device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_latents=True,
                                 output_hidden_states=True, latent_feedback=feedback)
            new = out.sequences[:, inputs["input_ids"].shape[1]:].tolist()
            for row, tokens in enumerate(new):
                slots = closed_span_slots(tokens, pad_id, start_id, end_id)
                if not slots:
                    continue
                rows_with_span += 1
                row_latents = out.latents[row]
                spans += row_latents.shape[0]
                # The token at generated index j was chosen from the step-j states; a slot's latent is the head's
                # map of the last of them (the last layer, after the final norm).
                states.append(torch.stack([torch.stack([layer[row, -1] for layer in out.hidden_states[j]])
                                           for j in slots], dim=1).float().cpu())
                lengths = [len(s) for s in _split_runs(slots)]
                fed.append(torch.cat([row_latents[s, :n] for s, n in enumerate(lengths)]).float().cpu())
    finally:
        model.latent_head.ema_norm.copy_(ema_norm)
    return dict(states=torch.cat(states, dim=1) if states else None, fed=torch.cat(fed) if fed else None,
                rows_with_span=rows_with_span, spans=spans)


def _split_runs(indices: list[int]) -> list[list[int]]:
    """Consecutive runs of sorted indices (the slots of each span)."""
    runs = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


@torch.no_grad()
def diagnose(model, processor, rows, batch_size: int = 8, dataset_rows=None, feedback_modes=FEEDBACK_MODES,
             max_new_tokens: int = 64) -> dict:
    """The norm diagnosis, measured where the latents are fed.

    - `layers`, `text_ratio`, `image_ratio`: per layer, the mean hidden-state norm at text / image positions of the
      prompts over their input embeddings' (layer 0; the last layer is after the final norm).
    - `visual_input_embedding_norm`: the mean norm of the visual input embeddings (what fills the image slots): the
      scale every latent is compared with; `visual_input_embeddings` its distribution.
    - `closed_loop` (GAP models): per feedback mode, greedy generation over `rows` (EvalRows) with that mode; the
      norms of the latents fed at every slot (`fed`, with `ratio` = mean fed norm / mean visual norm, the demo's
      "norm ratio") and per layer the mean norm of the states they were mapped from over the visual norm
      (`state_layer_ratio`; its last layer is what `raw` feeds).
    - `teacher_forced` (GAP models, `dataset_rows` in GAP's schema with spans): the state before each latent slot,
      mapped by each feedback mode's head (`feedback`), the targets fed (`fed_targets`), and `state_layer_ratio`.
    - `feedback_ratio`: the closed-loop ratio per mode (the figure the study reports).
    """
    curves = layer_norms(model, processor, rows, batch_size)
    visual = curves.pop("visual_norms")
    scale = visual.mean().item()
    result = dict(curves, visual_input_embedding_norm=scale, visual_input_embeddings=_norm_summary(visual, scale),
                  final_text_ratio=curves["text_ratio"][-1], final_image_ratio=curves["image_ratio"][-1],
                  closed_loop={}, teacher_forced=None, feedback_ratio={}, notes=[],
                  own_feedback=getattr(model.config, "latent_feedback", None))
    head = getattr(model, "latent_head", None)
    if head is None or getattr(model.config, "latent_start_token_id", None) is None:
        result["notes"].append("not a GAP model: no latents are fed, only the per-layer curves apply")
        return result
    for mode in feedback_modes:
        loop = closed_loop_states(model, processor, rows, mode, batch_size, max_new_tokens)
        entry = dict(rows=len(rows), rows_with_span=loop["rows_with_span"], spans=loop["spans"])
        if loop["fed"] is not None:
            entry["fed"] = _norm_summary(loop["fed"].norm(dim=-1), scale)
            entry["state_layer_ratio"] = (loop["states"].norm(dim=-1).mean(-1) / scale).tolist()
            result["feedback_ratio"][mode] = entry["fed"]["ratio"]
        result["closed_loop"][mode] = entry
    if not result["feedback_ratio"]:
        result["notes"].append(NORMS_NO_SPAN_NOTE)
    spans = [r for r in (dataset_rows or []) if r.get("aux_images") and "messages" in r]
    taught = teacher_forced_states(model, processor, spans, batch_size) if spans else dict(states=None)
    if taught["states"] is not None:
        final = taught["states"][-1]
        feedback = {}
        for mode in feedback_modes:
            if mode == "ema_norm" and float(head.ema_norm) == 0:
                continue  # uncalibrated: it would feed zeros
            feedback[mode] = _norm_summary(head(final.to(head.pca_mean), feedback=mode).norm(dim=-1), scale)
        result["teacher_forced"] = dict(
            rows=len(spans), slots=final.shape[0], feedback=feedback,
            fed_targets=_norm_summary(taught["fed_targets"].norm(dim=-1), scale),
            state_layer_ratio=(taught["states"].norm(dim=-1).mean(-1) / scale).tolist())
    elif dataset_rows is not None:
        result["notes"].append("no dataset row with a latent span and its aux image: no teacher-forced figures")
    return result


def _violin(ax, position: float, ratios: list[float], color: str):
    """One violin of log10 ratios at `position`; a (nearly) degenerate distribution (ema_norm's is one value by
    construction) is drawn as a bar."""
    import math

    values = [math.log10(max(v, 1e-12)) for v in ratios]
    if max(values) - min(values) < 0.01:  # narrower than the line: a violin would not show
        ax.hlines(sum(values) / len(values), position - 0.3, position + 0.3, color=color, linewidth=3)
    else:
        parts = ax.violinplot([values], positions=[position], widths=0.8, showmedians=True, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(color)
            body.set_alpha(0.6)
        parts["cmedians"].set_color("black")


def plot_norms(result: dict, path: str, title: str = ""):
    """norms.png, two panels. Left: the distribution of per-latent norms over the mean visual input-embedding norm
    (log scale; 1 = the scale of the visual embeddings), per feedback mode, closed loop (what `generate` fed) and
    teacher-forced (the head applied to the state before each slot), beside the visual input embeddings themselves
    and the targets; each labelled with its mean. Right: per layer, the mean norm at text / image positions over
    their input embeddings, and of the states the latents are mapped from over the visual input-embedding norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, MaxNLocator

    colors = {"raw": "tab:red", "ema_norm": "tab:green", "pca": "tab:purple", "visual": "tab:gray",
              "targets": "tab:blue"}
    groups = [("visual input\nembeddings", result["visual_input_embeddings"], "visual")]
    taught = result.get("teacher_forced") or {}
    if taught:
        groups.append(("targets fed\n(teacher-forced)", taught["fed_targets"], "targets"))
    for mode, entry in result.get("closed_loop", {}).items():
        if "fed" in entry:
            groups.append((f"{mode}\nclosed loop", entry["fed"], mode))
    for mode, entry in taught.get("feedback", {}).items():
        groups.append((f"{mode}\nteacher-forced", entry, mode))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw=dict(width_ratios=[1.5, 1]))
    for position, (label, entry, color) in enumerate(groups):
        _violin(left, position, entry["ratios"], colors[color])
        left.annotate(f"{entry['ratio']:.2f}", xy=(position, math.log10(max(entry["ratio"], 1e-12))),
                      xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
    left.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    left.set_xticks(range(len(groups)), [f"{g[0]}\n(n = {g[1]['count']})" for g in groups], fontsize=7)
    low = min(math.floor(math.log10(max(min(g[1]["ratios"]), 1e-12))) for g in groups)
    high = max(math.ceil(math.log10(max(max(g[1]["ratios"]), 1e-12))) for g in groups)
    left.yaxis.set_major_locator(FixedLocator(range(low, high + 1)))
    left.set_yticklabels([f"{10.0 ** e:g}" for e in range(low, high + 1)])
    left.set_ylabel("norm / mean visual input-embedding norm (log)")
    left.set_title("per-latent norms where they are fed (number: mean ratio)", fontsize=9)

    right.plot(result["layers"], result["text_ratio"], marker="o", label="text positions / their input embeddings")
    right.plot(result["layers"], result["image_ratio"], marker="s", label="image positions / their input embeddings")
    own = result.get("own_feedback")
    for mode, entry in result.get("closed_loop", {}).items():
        if "state_layer_ratio" in entry and (own is None or mode == own):
            right.plot(result["layers"], entry["state_layer_ratio"], marker="^", color=colors[mode],
                       label=f"states fed from ({mode} closed loop) / visual embedding norm")
    if taught:
        right.plot(result["layers"], taught["state_layer_ratio"], marker="v", linestyle="--", color="black",
                   label="states before each slot (teacher-forced) / visual embedding norm")
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set_yscale("log")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("layer (0 = input embeddings; last = after the final norm)")
    right.set_ylabel("mean norm ratio (log)")
    right.set_title("norm regimes across depth", fontsize=9)
    right.legend(fontsize=6)
    fig.suptitle(title or "Norm diagnosis", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def norms_summary_line(result: dict) -> str:
    """One line: the final-layer ratios and, per feedback mode, the fed latents' norm over the visual norm."""
    line = (f"final states / input embeddings: text {result['final_text_ratio']:.1f}x, image "
            f"{result['final_image_ratio']:.1f}x")
    if result["feedback_ratio"]:
        line += ("; fed latents / visual input-embedding norm, closed loop: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in result["feedback_ratio"].items()))
    if result.get("teacher_forced"):
        line += ("; teacher-forced (head on the state before each slot): "
                 + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in result["teacher_forced"]["feedback"].items()))
    return line


def run_norm_diagnosis(args) -> dict:
    """`gap diagnose-norms`: writes `norms.json` and `norms.png` to `args.output_dir`."""
    from .dataset_loader import load_split

    model, processor = load_eval_model(args)
    split = load_split(args.dataset_name, args.dataset_split, args.dataset_config)
    if args.limit:
        split = split.select(range(min(args.limit, len(split))))
    rows = [standardize_row(row, args.column_mapping, index=i) for i, row in enumerate(split)]
    dataset_rows = list(split) if {"messages", "aux_images"} <= set(split.column_names) else None
    modes = [args.latent_feedback] if args.latent_feedback else FEEDBACK_MODES
    result = diagnose(model, processor, rows, batch_size=args.batch_size, dataset_rows=dataset_rows,
                      feedback_modes=modes, max_new_tokens=args.max_new_tokens)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "norms.json"), result)
    plot_norms(result, os.path.join(args.output_dir, "norms.png"),
               title=os.path.basename(os.path.normpath(str(args.model_name_or_path))))
    print(norms_summary_line(result))
    for note in result["notes"]:
        print(f"note: {note}.")
    return result


# ---- latent lens -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def latent_similarity_maps(model, processor, row, max_new_tokens: int = 64, **generate_kwargs):
    """(maps (num_spans, K, gh, gw) cosine similarities, generated text) for one EvalRow's first image."""
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    inputs = processor(images=[i.convert("RGB") for i in row.images], text=[build_prompt(processor, row)],
                       return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_latents=True,
                         **generate_kwargs)
    visual, grid = first_image_tokens(model, inputs)
    text = processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return lens_maps(out.latents[0], visual, grid), text


@torch.no_grad()
def first_image_tokens(model, inputs) -> tuple[torch.Tensor, tuple[int, int]]:
    """The visual tokens of the first image of a processor batch, (tokens, hidden) as they fill its
    `<|image_pad|>` slots, and their grid (gh, gw) after the spatial merge."""
    grid = inputs["image_grid_thw"][0]
    merge = model.config.vision_config.spatial_merge_size
    visual = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    return visual, (int(grid[1]) // merge, int(grid[2]) // merge)


def lens_maps(latents: torch.Tensor, visual: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of each fed latent (spans, K, hidden) to each visual token (tokens, hidden), on the
    token grid: (spans, K, gh, gw), float32 on the CPU."""
    latents = latents.to(visual.device, visual.dtype)
    similarity = F.cosine_similarity(latents[:, :, None, :], visual[None, None], dim=-1)  # (spans, K, tokens)
    return similarity.reshape(*similarity.shape[:2], *grid).float().cpu()


def _drawable(text: str) -> str:
    """`text` with every character the figure font cannot draw (or not printable) as "?": generated text may hold
    any character, and matplotlib warns for each glyph its font lacks."""
    from matplotlib.font_manager import FontProperties, findfont
    from matplotlib.ft2font import FT2Font

    drawable = set(FT2Font(findfont(FontProperties())).get_charmap())
    return "".join(ch if ch.isprintable() and ord(ch) in drawable else "?" for ch in text)


def draw_lens(image, maps: torch.Tensor, path, title: str = "", first: tuple[int, int] = (0, 0)):
    """lens_<row>.png: rows are spans, columns latents; each panel the similarity heatmap over the image, with one
    colour bar (cosine similarity, -1 to 1) for all. `path` may be a file object (PNG); `first` numbers the
    panels of a slice of the maps (the Space draws one latent per figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans, k = maps.shape[:2]
    fig, axes = plt.subplots(max(spans, 1), max(k, 1), figsize=(1.8 * max(k, 1) + 0.8, 1.9 * max(spans, 1) + 0.5),
                             squeeze=False)
    heat = None
    for s in range(max(spans, 1)):
        for j in range(max(k, 1)):
            ax = axes[s][j]
            ax.imshow(image)
            if spans:
                grid = F.interpolate(maps[s, j][None, None], size=image.size[::-1], mode="nearest")[0, 0]
                heat = ax.imshow(grid, cmap="inferno", alpha=0.55, vmin=-1, vmax=1)
                ax.set_title(f"span {s + first[0]} latent {j + first[1]}", fontsize=7)
            ax.axis("off")
    if heat is not None:
        fig.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.8, label="cosine similarity to visual token")
    title = "\n".join(_drawable(line) for line in title.split("\n"))
    if not spans:
        title = f"{title}\nno latent span generated: nothing to draw"
    fig.suptitle(title, fontsize=8, parse_math=False)  # generated text is not TeX: a "$" stays a "$"
    fig.savefig(path, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def run_latent_lens(args) -> list[dict]:
    """`gap latent-lens`: writes `lens_<row>.png` and `lens.json` to `args.output_dir`."""
    model, processor = load_eval_model(args)
    os.makedirs(args.output_dir, exist_ok=True)
    report, without_span = [], 0
    for index, row in enumerate(load_eval_rows(args)):
        maps, text = latent_similarity_maps(model, processor, row, args.max_new_tokens)
        gold = reference_answer(row)
        draw_lens(row.images[0].convert("RGB"), maps, os.path.join(args.output_dir, f"lens_{index}.png"),
                  title=f"generated: {text[:70]}\ngold answer: {gold}")
        report.append(dict(row=index, question=row.question, gold=gold, generated=text, maps=maps.tolist()))
        without_span += maps.shape[0] == 0
        print(f"row {index}: {maps.shape[0]} span(s); gold {gold!r}; generated {text[:60]!r}")
    if report and without_span == len(report):
        print(f"note: {NO_SPAN_NOTE}.")
    with open(os.path.join(args.output_dir, "lens.json"), "w") as f:
        json.dump(report, f)
    return report


__all__ = [
    "FEEDBACK_MODES",
    "closed_loop_states",
    "closed_span_slots",
    "diagnose",
    "draw_lens",
    "first_image_tokens",
    "latent_similarity_maps",
    "layer_norms",
    "lens_maps",
    "norms_summary_line",
    "plot_norms",
    "probe",
    "probe_markdown",
    "run_latent_lens",
    "run_norm_diagnosis",
    "run_probe",
    "teacher_forced_states",
]
