"""How a GAP checkpoint adjusts vLLM's configuration at start (kept light: imported in every vLLM process)."""

import logging

logger = logging.getLogger("vllm.gap_vllm")


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
        return None
