"""Feature-level alignment, as a stage: fit the PCA-aligned latent head on calibration images and write the GAP
checkpoint (`gap fit-pca`).

A stock Qwen2.5-VL checkpoint is converted first (`from_qwen2_5_vl`: the three latent tokens and a fresh head; stock
weights untouched). The images' visual input embeddings (vision tower + merger: what fills `<|image_pad|>`) are
streamed into running moments; mu, U_r and s_r (and the `ema_norm` buffer) are written into the head, and the model
and processor saved with their remote code, with `pca_fit.json` (the fit's summary) beside them.
"""

import json
import os

from .dataset_loader import load_split
from .model_loader import load_model


def calibration_images(rows, columns: list[str], limit: int):
    """Stream up to `limit` RGB images from the given (list-of-)image columns of `rows`."""
    seen = 0
    for row in rows:
        for column in columns:
            value = row.get(column)
            for image in (value if isinstance(value, list) else [value] if value is not None else []):
                yield image.convert("RGB")
                seen += 1
                if seen >= limit:
                    return


def fit_pca_on_rows(model, processor, dataset, num_rows: int) -> int:
    """Fit the latent head's PCA (and `ema_norm`) on the question and aux images of the first `num_rows` rows;
    returns the number of visual vectors."""
    from modeling_gap import fit_latent_head_pca

    rows = dataset.select(range(min(num_rows, len(dataset))))
    images = calibration_images(rows, ["images", "aux_images"], limit=10**9)
    return fit_latent_head_pca(model, images, image_processor=processor.image_processor)["count"]


def fit_pca(args) -> dict:
    """`gap fit-pca` (`args`: a `trainers.arguments.FitPCAArguments`): returns the fit's summary."""
    from modeling_gap import fit_latent_head_pca

    if not args.model_name_or_path or not args.dataset_name:
        raise ValueError("--model_name_or_path and --dataset_name are required.")
    model, processor = load_model(
        args.model_name_or_path, stock="convert", trust_remote_code=args.trust_remote_code,
        allow_pickle_weights=args.allow_pickle_weights,
        gap_options=dict(num_latent_tokens=args.num_latent_tokens, latent_feedback=args.latent_feedback,
                         latent_pca_rank=args.latent_pca_rank),
    )
    split = load_split(args.dataset_name, args.dataset_split, args.dataset_config)
    columns = [c.strip() for c in args.image_columns.split(",") if c.strip()]
    if missing := [c for c in columns if c not in split.column_names]:
        raise ValueError(f"image column(s) {missing} not in the dataset (columns: {split.column_names}).")
    images = calibration_images(split, columns, args.max_images)
    stats = fit_latent_head_pca(model, images, image_processor=processor.image_processor, rank=args.rank,
                                method=args.method, batch_size=args.batch_size, progress=True)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    summary = dict(vectors=stats["count"], rank=int(stats["scale"].shape[0]), mean_norm=stats["mean_norm"],
                   explained_std_top5=stats["scale"][:5].tolist(), method=args.method)
    with open(os.path.join(args.output_dir, "pca_fit.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"fitted rank {summary['rank']} on {summary['vectors']} visual tokens; wrote {args.output_dir}")
    return summary


__all__ = ["calibration_images", "fit_pca", "fit_pca_on_rows"]
