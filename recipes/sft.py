"""Supervised fine-tuning of a GAP model with `GapSFTTrainer` (`trainers.sft`).

    python recipes/sft.py --config recipes/tiny/sft/config_pca.yaml              # tiny, offline, CPU
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/sft.py \
        --config recipes/qwen2_5_vl_7b/sft/config_pca_lora.yaml

The same as `gap sft ...` (and `accelerate launch ... -m trainers.cli sft ...`).
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("sft")
