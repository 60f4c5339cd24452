"""Latent lens: where does each generated latent "look"? Cosine similarity of every latent to the visual tokens of
the input image, drawn as a heatmap over the image.

    python recipes/latent_lens.py --model_name_or_path ORG/gap-7b --dataset_name DIR --limit 4 \\
        --output_dir outputs/lens

For each row: generate (greedy) with `return_latents=True`; for each span s and slot k, the similarity of the fed
latent to each merged visual token of the (first) input image, laid on its token grid, upsampled and overlaid on the
image. Writes `lens_<row>.png` (rows: spans, columns: latents) and `lens.json` (the similarity grids).
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from trainers.evaluation import EvalArguments, build_prompt, load_eval_rows, load_model_and_processor  # noqa: E402


@torch.no_grad()
def latent_similarity_maps(model, processor, row, max_new_tokens: int = 64, **generate_kwargs):
    """(maps (num_spans, K, gh, gw) cosine similarities, generated text) for one EvalRow's first image."""
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    inputs = processor(images=[i.convert("RGB") for i in row.images], text=[build_prompt(processor, row)],
                       return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_latents=True,
                         **generate_kwargs)
    grid = inputs["image_grid_thw"][0]
    merge = model.config.vision_config.spatial_merge_size
    gh, gw = int(grid[1]) // merge, int(grid[2]) // merge
    visual = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    latents = out.latents[0].to(visual.dtype)  # (spans, K, d)
    similarity = F.cosine_similarity(latents[:, :, None, :], visual[None, None], dim=-1)  # (spans, K, tokens)
    text = processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return similarity.reshape(*similarity.shape[:2], gh, gw).float().cpu(), text


def draw(image, maps: torch.Tensor, path: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans, k = maps.shape[:2]
    fig, axes = plt.subplots(max(spans, 1), k, figsize=(1.8 * k, 1.9 * max(spans, 1)), squeeze=False)
    for s in range(max(spans, 1)):
        for j in range(k):
            ax = axes[s][j]
            ax.imshow(image)
            if spans:
                heat = F.interpolate(maps[s, j][None, None], size=image.size[::-1], mode="nearest")[0, 0]
                ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=-1, vmax=1)
                ax.set_title(f"span {s} latent {j}", fontsize=7)
            ax.axis("off")
    title = "".join(ch if ch.isprintable() else " " for ch in title)
    fig.suptitle(title or ("no latent span generated" if not spans else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: EvalArguments) -> list[dict]:
    model, processor = load_model_and_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    os.makedirs(args.output_dir, exist_ok=True)
    report = []
    for index, row in enumerate(load_eval_rows(args)):
        maps, text = latent_similarity_maps(model, processor, row, args.max_new_tokens)
        draw(row.images[0].convert("RGB"), maps, os.path.join(args.output_dir, f"lens_{index}.png"), title=text[:80])
        report.append(dict(row=index, generated=text, maps=maps.tolist()))
        print(f"row {index}: {maps.shape[0]} span(s); {text[:60]!r}")
    with open(os.path.join(args.output_dir, "lens.json"), "w") as f:
        json.dump(report, f)
    return report


if __name__ == "__main__":
    from trl import TrlParser

    (lens_args,) = TrlParser((EvalArguments,)).parse_args_and_config()
    main(lens_args)
