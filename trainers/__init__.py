"""TRL-based training of GAP models: `GapSFTConfig` / `GapSFTTrainer`, the `GapDataCollator` and dataset checks, and
an offline synthetic task; `trainers.evaluation` holds the evaluation helpers.

The names below are imported lazily, so that `import trainers.evaluation` (or `trainers.data`) does not load TRL.
"""

import importlib

_EXPORTS = {
    "data": [
        "ROW_INDEX_COLUMN",
        "GapDataCollator",
        "GapDataError",
        "GapDatasetValidationError",
        "remove_latent_markers",
        "validate_gap_dataset",
    ],
    "gap_sft_config": [
        "GAP_LORA_MODULES_TO_SAVE",
        "GAP_LORA_TARGET_MODULES",
        "GAP_QUANTIZATION_SKIP_MODULES",
        "GapSFTConfig",
        "gap_lora_config",
        "gap_quantization_config",
    ],
    "gap_sft_trainer": ["GapSFTTrainer"],
    "synthetic": ["make_synthetic_dataset", "make_synthetic_rows"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
