"""The paper's norm diagnosis for any Qwen2.5-VL or GAP checkpoint (`trainers.diagnostics`).

    python recipes/diagnose_norms.py --model_name_or_path outputs/demo/pca --dataset_name outputs/demo/test_data

The same as `gap diagnose-norms ...`.
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("diagnose-norms")
