"""Convert Monet, Mirage or LVR latent-reasoning data to GAP's dataset schema (`trainers.dataset_conversion`).

    python recipes/convert_dataset.py --format monet --input Monet-SFT-125K/train.json \
        --image-root Monet-SFT-125K --output data/monet-gap

The same as `gap convert ...`.
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("convert")
