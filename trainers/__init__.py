"""The GAP library: everything the `gap` command and the recipes run, one concept per module.

- `schema`: the columns of a row, the features of a converted dataset, the text of its messages;
- `collator`: `GapDataCollator` (rows -> model inputs, capacity selection) and `validate_gap_dataset`;
- `gap_sft_config` / `gap_sft_trainer`: `GapSFTConfig` and `GapSFTTrainer` (TRL's SFT with GAP's latent loss);
- `model_loader`: one loader for every stage (tiny | stock converted | GAP checkpoint), LoRA / quantization configs;
- `dataset_loader`, `dataset_conversion` (Monet / Mirage / LVR), `pca_fit`, `capacity`, `sft`: the stages;
- `evaluation` (column mappings, answer extraction, the shipped metric), `diagnostics` (probe, norms, latent lens);
- `hub`: variants, checkpoint checks, cards from `templates/`, the one-commit push;
- `synthetic` (the offline task), `tiny` (the tiny random model), `arguments` (each stage's dataclass), `cli` (`gap`).
- `lmms_eval_plugin`: the lmms-eval model `gap` (entry point), local lmms-eval tasks, the `gap lmms-eval` wrapper.

The names below are imported lazily, so that `import trainers.evaluation` (or `trainers.collator`) does not load TRL.
"""

import importlib
import logging


class _KnownHarmless(logging.Filter):
    """bitsandbytes' CPU backend logs a warning at import when the optional `kernels` package (which downloads
    kernels from the Hub) is absent; it then uses its built-in CPU kernels, which is what runs here. Only that
    message is dropped."""

    def filter(self, record):
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KnownHarmless())

_EXPORTS = {
    "collator": [
        "ROW_INDEX_COLUMN",
        "GapDataCollator",
        "GapDataError",
        "GapDatasetValidationError",
        "validate_gap_dataset",
    ],
    "schema": ["remove_latent_markers"],
    "gap_sft_config": ["GapSFTConfig"],
    "gap_sft_trainer": ["GapSFTTrainer"],
    "model_loader": [
        "GAP_LORA_MODULES_TO_SAVE",
        "GAP_LORA_TARGET_MODULES",
        "GAP_QUANTIZATION_SKIP_MODULES",
        "gap_lora_config",
        "gap_quantization_config",
        "load_model",
    ],
    "synthetic": ["make_synthetic_dataset", "make_synthetic_rows"],
    "tiny": ["build_tiny_gap", "save_tiny_qwen2_5_vl"],
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
