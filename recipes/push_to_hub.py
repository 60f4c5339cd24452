"""Publish a GAP variant to the Hub in one commit (`trainers.hub`).

    HF_TOKEN=hf_... python recipes/push_to_hub.py --variant hub_configs/gap-qwen2.5-vl-7b-pca.yaml \
        --checkpoint outputs/gap-qwen2.5-vl-7b-pca --repo-id ORG/gap-qwen2.5-vl-7b-pca

The same as `gap push ...`.
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("push")
