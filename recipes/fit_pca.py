"""Fit the PCA-aligned latent head on calibration images and write the GAP checkpoint.

    python recipes/fit_pca.py --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --dataset_name DIR \\
        --image_columns images,aux_images --max_images 2048 --output_dir outputs/gap-7b-pca

A stock Qwen2.5-VL checkpoint is converted first (`from_qwen2_5_vl`: the three latent tokens and a fresh head; stock
weights untouched). The images' visual input embeddings (vision tower + merger: what fills `<|image_pad|>`) are
streamed into running moments; mu, U_r and s_r (and the `ema_norm` buffer) are written into the head, and the model
and processor saved with their remote code.
"""

import json
import os
import sys
from dataclasses import dataclass, field

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


@dataclass
class FitPCAArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "GAP checkpoint, or a stock Qwen2.5-VL to convert."})
    dataset_name: str = field(default=None, metadata={"help": "A `save_to_disk` directory or a Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split whose images calibrate."})
    image_columns: str = field(default="images,aux_images", metadata={"help": "Comma list of image columns to use."})
    max_images: int = field(default=2048, metadata={"help": "Stop after this many images."})
    rank: int | None = field(default=None, metadata={"help": "PCA rank r (default: config.latent_pca_rank, capped)."})
    method: str = field(default="exact", metadata={"help": "exact | randomized (torch.svd_lowrank)."})
    batch_size: int = field(default=8, metadata={"help": "Images per vision-tower forward."})
    num_latent_tokens: int = field(default=8, metadata={"help": "K, when converting a stock checkpoint."})
    latent_feedback: str = field(default="pca", metadata={"help": "Feedback mode, when converting a stock checkpoint."})
    output_dir: str = field(default="outputs/gap-pca", metadata={"help": "Where the fitted checkpoint is written."})


def load_or_convert(model_name_or_path: str, **gap_options):
    """A GAP model and processor: loaded if the checkpoint is one, converted from stock Qwen2.5-VL otherwise."""
    from transformers import AutoConfig

    from modeling_gap import from_qwen2_5_vl
    from trainers.evaluation import load_model_and_processor

    if AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True).model_type == "qwen2_5_vl":
        return from_qwen2_5_vl(model_name_or_path, **gap_options)
    return load_model_and_processor(model_name_or_path)


def calibration_images(split, columns: list[str], limit: int):
    """Stream up to `limit` images from the given (list-of-)image columns."""
    seen = 0
    for row in split:
        for column in columns:
            value = row.get(column)
            for image in (value if isinstance(value, list) else [value] if value is not None else []):
                yield image.convert("RGB")
                seen += 1
                if seen >= limit:
                    return


def main(args: FitPCAArguments) -> dict:
    from modeling_gap import fit_latent_head_pca
    from trainers.evaluation import load_split

    if not args.model_name_or_path or not args.dataset_name:
        raise SystemExit("--model_name_or_path and --dataset_name are required.")
    model, processor = load_or_convert(args.model_name_or_path, num_latent_tokens=args.num_latent_tokens,
                                       latent_feedback=args.latent_feedback)
    split = load_split(args.dataset_name, args.dataset_split, args.dataset_config)
    columns = [c.strip() for c in args.image_columns.split(",") if c.strip()]
    missing = [c for c in columns if c not in split.column_names]
    if missing:
        raise SystemExit(f"image column(s) {missing} not in the dataset (columns: {split.column_names}).")
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


if __name__ == "__main__":
    from trl import TrlParser

    (fit_args,) = TrlParser((FitPCAArguments,)).parse_args_and_config()
    main(fit_args)
