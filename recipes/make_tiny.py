"""Write a tiny, random, fully offline GAP checkpoint (weights, remote code, processor) to a directory.

    python recipes/make_tiny.py --output outputs/tiny-gap [--latent-feedback pca] [--num-latent-tokens 4]

Load it back with `AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_gap.tiny import build_tiny_gap  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-latent-tokens", type=int, default=4)
    parser.add_argument("--latent-feedback", default="pca", choices=["pca", "ema_norm", "raw"])
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    args = parser.parse_args(argv)
    model, processor = build_tiny_gap(
        seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_latent_tokens=args.num_latent_tokens, latent_feedback=args.latent_feedback,
    )
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"wrote a tiny GAP checkpoint to {args.output}")
    return args.output


if __name__ == "__main__":
    main()
