"""GAP (Granular Alignment Paradigm) visual-latent reasoning on Qwen2.5-VL.

The files of this package are what a checkpoint publishes as remote code: they import only torch, transformers and
each other.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .configuration_gap import LATENT_PRESETS, GapQwen2_5VLConfig
from .generation_gap import GapGenerateOutput
from .modeling_gap import (
    GapCausalLMOutputWithPast,
    GapLatentHead,
    GapQwen2_5VLForConditionalGeneration,
    StreamingPCA,
    add_latent_tokens,
    fit_latent_head_pca,
    from_qwen2_5_vl,
    pool_latent_targets,
)
from .processing_gap import GapQwen2_5VLProcessor

# `save_pretrained` then writes `auto_map` and copies the code, so checkpoints load with trust_remote_code=True.
GapQwen2_5VLConfig.register_for_auto_class()
GapQwen2_5VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
GapQwen2_5VLProcessor.register_for_auto_class("AutoProcessor")

# With the package installed, local checkpoints also load without remote code.
AutoConfig.register(GapQwen2_5VLConfig.model_type, GapQwen2_5VLConfig, exist_ok=True)
AutoModelForImageTextToText.register(GapQwen2_5VLConfig, GapQwen2_5VLForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(GapQwen2_5VLConfig, GapQwen2_5VLForConditionalGeneration, exist_ok=True)
AutoProcessor.register(GapQwen2_5VLConfig, GapQwen2_5VLProcessor, exist_ok=True)

__all__ = [
    "LATENT_PRESETS",
    "GapCausalLMOutputWithPast",
    "GapGenerateOutput",
    "GapLatentHead",
    "GapQwen2_5VLConfig",
    "GapQwen2_5VLForConditionalGeneration",
    "GapQwen2_5VLProcessor",
    "StreamingPCA",
    "add_latent_tokens",
    "fit_latent_head_pca",
    "from_qwen2_5_vl",
    "pool_latent_targets",
]
