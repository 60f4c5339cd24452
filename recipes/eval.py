"""Evaluate a GAP (or stock Qwen2.5-VL) checkpoint by generation over a split (`trainers.evaluation`).

    python recipes/eval.py --config recipes/tiny/eval/config_pca.yaml

The same as `gap eval ...`.
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("eval")
