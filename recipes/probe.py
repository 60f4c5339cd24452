"""Intervention probing: accuracy under each intervention on the fed latents (`trainers.diagnostics`).

    python recipes/probe.py --model_name_or_path outputs/demo/pca --dataset_name outputs/demo/test_data

The same as `gap probe ...`.
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("probe")
