"""How a GAP checkpoint adjusts vLLM's configuration at start (kept light: imported in every vLLM process)."""

import logging

logger = logging.getLogger("vllm.gap_vllm")

TOKENIZER_MODE = "gap"
"""The tokenizer / renderer mode that selects `processing.GapRenderer` (vLLM's HF tokenizer and renderer, plus the
refusal of prompts holding latent slots); chosen for GAP checkpoints unless another mode is named."""


class GapServingConfig:
    """`MODELS_CONFIG_MAP` entry for the GAP architecture (vLLM's per-architecture config hook): full CUDA graphs
    would capture the V1 forward with the GAP feed in it; until that is shown exact on a GPU, graphs are piecewise
    (the backbone captured, the GAP code eager)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.config.compilation import CUDAGraphMode

        compilation = vllm_config.compilation_config
        mode = compilation.cudagraph_mode
        if mode is not None and mode != CUDAGraphMode.NONE and mode.has_full_cudagraphs():
            logger.warning("gap_vllm: cudagraph_mode %s captures the GAP feed; using PIECEWISE instead.", mode.name)
            compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
        elif mode is None:
            compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        select_tokenizer_mode(model_config)


def register_tokenizer_mode() -> None:
    """Register the tokenizer mode `"gap"`: vLLM's HF tokenizer, rendered by `GapRenderer` (idempotent; call it from
    the `vllm.general_plugins` entry point)."""
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers import TokenizerRegistry

    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, "vllm.tokenizers.hf", "CachedHfTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "gap_vllm.processing", "GapRenderer")


def select_tokenizer_mode(model_config) -> None:
    """For the GAP architecture's `verify_and_update_model_config(model_config)` hook: serve a GAP checkpoint through
    `GapRenderer` (HF tokenizer and renderer, plus the prompt check) unless the user named a tokenizer mode other than
    vLLM's default HF one."""
    if model_config.tokenizer_mode in ("auto", "hf"):
        register_tokenizer_mode()
        model_config.tokenizer_mode = TOKENIZER_MODE
