"""Write a tiny, random, fully offline GAP checkpoint (or, with `--stock`, a stock Qwen2.5-VL one) (`trainers.tiny`).

    python recipes/make_tiny.py --output_dir outputs/tiny-gap

The same as `gap make-tiny ...`.
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("make-tiny")
