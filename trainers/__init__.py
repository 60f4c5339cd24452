"""TRL-based trainers for GAP models (GapSFTConfig / GapSFTTrainer)."""
