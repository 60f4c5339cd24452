"""Capacity-level alignment: the base model's pass rate per training row, and `use_latent` (`trainers.capacity`).

    python recipes/assign_capacity.py --config recipes/qwen2_5_vl_7b/assign_capacity/config_default.yaml

The same as `gap assign-capacity ...`.
"""

from trainers.cli import run_stage

if __name__ == "__main__":
    run_stage("assign-capacity")
