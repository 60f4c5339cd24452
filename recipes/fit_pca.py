"""Fit the PCA-aligned latent head on calibration images and write the GAP checkpoint (`trainers.pca_fit`).

    python recipes/fit_pca.py --config recipes/qwen2_5_vl_7b/fit_pca/config_pca.yaml

The same as `gap fit-pca ...`.
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("fit-pca")
