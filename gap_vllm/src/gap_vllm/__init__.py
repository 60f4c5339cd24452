"""Serve GAP visual-latent Qwen2.5-VL checkpoints with vLLM (V1 engine): a plugin, no patched runner.

Installed, this distribution declares two entry points that vLLM loads in every process:

- `vllm.general_plugins` -> `register()`: registers the architecture `GapQwen2_5VLForConditionalGeneration`
  with `ModelRegistry` and `modeling_gap`'s config class with transformers' `AutoConfig`;
- `vllm.logits_processors` -> `gap_vllm.spans:GapLatentSpanProcessor`: the span rule and per-request state.

Per-request options go in `SamplingParams.extra_args` (server: `vllm_xargs`): `latent_intervention` (`"zero"`,
`"drop"`), `max_latent_spans`, `latent_feedback` (`"pca"`, `"ema_norm"`, `"raw"`).
"""

from .config import ARCHITECTURE, MODEL_TYPE

__version__ = "0.1.0"


def register() -> None:
    """The `vllm.general_plugins` entry point (vLLM calls it in every process, possibly more than once)."""
    from transformers import AutoConfig, AutoModel
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from modeling_gap import GapQwen2_5VLConfig

    from .config import GapBackbone
    from .serving_config import GapServingConfig, register_tokenizer_mode

    AutoConfig.register(MODEL_TYPE, GapQwen2_5VLConfig, exist_ok=True)
    # The Transformers backend builds the decoder with `AutoModel.from_config`: GAP's backbone is Qwen2.5-VL's.
    AutoModel.register(GapQwen2_5VLConfig, GapBackbone, exist_ok=True)
    # vLLM's per-architecture config hook (as for its own models): piecewise CUDA graphs, the "gap" renderer.
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, GapServingConfig)
    register_tokenizer_mode()  # "gap": vLLM's HF renderer that also refuses prompts holding latent slots
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "gap_vllm.model:GapQwen2_5VLForConditionalGeneration")


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "register"]
