"""Diagnostics of a GAP (or stock Qwen2.5-VL) checkpoint: intervention probing, the norm diagnosis, the latent lens
(`gap probe`, `gap diagnose-norms`, `gap latent-lens`).

- Probing: accuracy under each intervention on the fed latents (`LATENT_INTERVENTIONS`: zeros; Gaussian noise at each
  latent's norm; a fixed permutation of the coordinates; the mean visual embedding; no span at all) and its change
  against none. If perturbing the latents costs accuracy, they carry task-relevant signal beyond extra token slots.
- Norms (the paper's diagnosis): per layer, the mean hidden-state norm at text and at image positions against the
  input embeddings' (on Monet-7B the final text states are ~546x their input embeddings, the vision states ~8.7x);
  layer 0 is the input embeddings, the last layer is after the final norm (the state Monet-style models feed back);
  and the norm of what each feedback mode would feed back, against the mean visual input embedding norm.
- Latent lens: the cosine similarity of every generated latent to the visual tokens of the row's first image, on
  its token grid, overlaid on the image.
"""

import json
import os

import torch
import torch.nn.functional as F

from modeling_gap.configuration_gap import LATENT_INTERVENTIONS

from .evaluation import build_prompt, evaluate_rows, load_eval_model, load_eval_rows, reference_answer
from .outputs import write_json

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
@torch.no_grad()
def diagnose(model, processor, rows, batch_size: int = 8) -> dict:
    """Mean norms per layer at text / image positions over `rows` (EvalRows), their ratios to the input embedding
    norms, and the norms of the latents each feedback mode would feed back (GAP models)."""
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    sums = None
    fed = {"raw": [], "ema_norm": [], "pca": []}
    visual_norms = []
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
        visual_norms.append(norms[0][image])
        last = outputs.last_hidden_state[:, -1]  # the state the next position (a latent slot) is computed from
        fed["raw"].append(last.float().norm(dim=-1))
        head = getattr(model, "latent_head", None)
        if head is not None:
            fed["pca"].append(head(last, feedback="pca").float().norm(dim=-1))
            if float(head.ema_norm) > 0:
                fed["ema_norm"].append(head(last, feedback="ema_norm").float().norm(dim=-1))
    text_mean, image_mean = (sums[0] / sums[1]).tolist(), (sums[2] / sums[3]).tolist()
    visual_embedding_norm = torch.cat(visual_norms).mean().item()
    result = dict(
        layers=list(range(len(text_mean))),
        text_norm=text_mean,
        image_norm=image_mean,
        text_ratio=[n / text_mean[0] for n in text_mean],
        image_ratio=[n / image_mean[0] for n in image_mean],
        visual_input_embedding_norm=visual_embedding_norm,
        feedback_norm={k: torch.cat(v).mean().item() for k, v in fed.items() if v},
    )
    result["feedback_ratio"] = {k: v / visual_embedding_norm for k, v in result["feedback_norm"].items()}
    result["final_text_ratio"], result["final_image_ratio"] = result["text_ratio"][-1], result["image_ratio"][-1]
    return result


def plot_norms(result: dict, path: str, title: str = ""):
    """norms.png: the two ratio curves per layer (integer layer ticks), and each feedback mode's fed-back norm ratio
    as a labelled horizontal line with its value written on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(result["layers"], result["text_ratio"], marker="o", label="text positions")
    ax.plot(result["layers"], result["image_ratio"], marker="s", label="image positions")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = input embeddings; last = after the final norm)")
    ax.set_ylabel("norm / input-embedding norm")
    colors = {"raw": "tab:red", "ema_norm": "tab:green", "pca": "tab:purple"}
    styles = {"raw": "--", "ema_norm": ":", "pca": "-."}
    for mode, ratio in result["feedback_ratio"].items():
        # Lines at exactly 1.0 would hide behind the frame's gridline: draw them thick, on top, with their value.
        ax.axhline(ratio, linestyle=styles[mode], linewidth=2, color=colors[mode], zorder=5,
                   label=f"fed back by {mode} / visual embedding norm = {ratio:.2f}")
        ax.annotate(f"{mode} {ratio:.2f}", xy=(result["layers"][-1], ratio), xytext=(-4, 3),
                    textcoords="offset points", ha="right", fontsize=7, color=colors[mode])
    low = min(min(result["text_ratio"]), min(result["image_ratio"]), *result["feedback_ratio"].values(), 1.0)
    high = max(max(result["text_ratio"]), max(result["image_ratio"]), *result["feedback_ratio"].values(), 1.0)
    ax.set_ylim(low / 2, high * 2)
    ax.set_title(title or "Norm regimes across depth", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_norm_diagnosis(args) -> dict:
    """`gap diagnose-norms`: writes `norms.json` and `norms.png` to `args.output_dir`."""
    model, processor = load_eval_model(args)
    result = diagnose(model, processor, load_eval_rows(args), batch_size=args.batch_size)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "norms.json"), result)
    plot_norms(result, os.path.join(args.output_dir, "norms.png"),
               title=os.path.basename(os.path.normpath(str(args.model_name_or_path))))
    print(f"final states / input embeddings: text {result['final_text_ratio']:.1f}x, "
          f"image {result['final_image_ratio']:.1f}x; fed back / visual embedding norm: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["feedback_ratio"].items()))
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
    title = "\n".join("".join(ch if ch.isprintable() else " " for ch in line) for line in title.split("\n"))
    if not spans:
        title = f"{title}\nno latent span generated: nothing to draw"
    fig.suptitle(title, fontsize=8)
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
    "diagnose",
    "draw_lens",
    "first_image_tokens",
    "latent_similarity_maps",
    "lens_maps",
    "plot_norms",
    "probe",
    "probe_markdown",
    "run_latent_lens",
    "run_norm_diagnosis",
    "run_probe",
]
