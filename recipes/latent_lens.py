"""Latent lens: where each generated latent looks in the image (`trainers.diagnostics`).

    python recipes/latent_lens.py --model_name_or_path outputs/demo/pca --dataset_name outputs/demo/test_data --limit 4

The same as `gap latent-lens ...`.
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("latent-lens")
