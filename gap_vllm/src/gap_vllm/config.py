"""The GAP fields of a checkpoint's config.json, read without `modeling_gap`.

`GapServeConfig` is registered with transformers' `AutoConfig` for `model_type="gap_qwen2_5_vl"`, so a checkpoint
as `save_pretrained` / `push_to_hub` writes it loads in a vLLM environment without `--trust-remote-code` (with it,
the checkpoint's own `configuration_gap.py` is used; both are subclasses of `Qwen2_5_VLConfig` with the same fields).
"""

from dataclasses import dataclass

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

MODEL_TYPE = "gap_qwen2_5_vl"
ARCHITECTURE = "GapQwen2_5VLForConditionalGeneration"
FEEDBACK_MODES = ("pca", "ema_norm", "raw")
INTERVENTIONS = (None, "zero", "drop")
SPAN_RULES = ("fixed", "sampled_end")


class GapServeConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL config plus the GAP fields vLLM needs (the training-only fields are kept as loaded)."""

    model_type = MODEL_TYPE

    num_latent_tokens: int = 8
    latent_feedback: str = "pca"
    latent_pca_rank: int = 256
    latent_pca_trainable: bool = False
    latent_loss_weight: float = 1.0
    latent_loss: str = "mse_whitened+cos"
    latent_ema_momentum: float = 0.99
    latent_target_pooling: str = "grid"
    latent_span_rule: str = "fixed"
    latent_max_tokens: int | None = None
    latent_preset: str = "gap"
    latent_pad_token: str = "<|latent_pad|>"
    latent_start_token: str = "<|latent_start|>"
    latent_end_token: str = "<|latent_end|>"
    latent_pad_token_id: int | None = None
    latent_start_token_id: int | None = None
    latent_end_token_id: int | None = None


@dataclass(frozen=True)
class GapSpec:
    """What serving needs from a GAP config: token ids, K, span rule, default feedback, head shape."""

    pad_id: int
    start_id: int
    end_id: int
    num_latent_tokens: int
    max_latents: int  # K for "fixed"; latent_max_tokens (default K) for "sampled_end"
    span_rule: str
    feedback: str
    hidden_size: int
    pca_rank: int
    rms_norm_eps: float

    @classmethod
    def from_hf_config(cls, config) -> "GapSpec":
        ids = (config.latent_pad_token_id, config.latent_start_token_id, config.latent_end_token_id)
        if any(i is None for i in ids):
            raise ValueError(
                "This GAP checkpoint's config has no latent token ids (latent_pad_token_id, latent_start_token_id, "
                "latent_end_token_id): convert it with modeling_gap.from_qwen2_5_vl and save it again."
            )
        rule = config.latent_span_rule
        if rule not in SPAN_RULES:
            raise ValueError(f"latent_span_rule must be one of {SPAN_RULES}; the checkpoint says {rule!r}.")
        if config.latent_feedback not in FEEDBACK_MODES:
            raise ValueError(f"latent_feedback must be one of {FEEDBACK_MODES}; the checkpoint says "
                             f"{config.latent_feedback!r}.")
        k = int(config.num_latent_tokens)
        max_latents = (config.latent_max_tokens or k) if rule == "sampled_end" else k
        text = config.text_config
        return cls(
            pad_id=int(ids[0]), start_id=int(ids[1]), end_id=int(ids[2]), num_latent_tokens=k,
            max_latents=int(max_latents), span_rule=rule, feedback=config.latent_feedback,
            hidden_size=int(text.hidden_size), pca_rank=min(int(config.latent_pca_rank), int(text.hidden_size)),
            rms_norm_eps=float(text.rms_norm_eps),
        )


class GapBackbone(Qwen2_5_VLModel):
    """Qwen2.5-VL's backbone (vision tower + decoder), the class vLLM's Transformers backend builds for a GAP
    config (`AutoModel.from_config`)."""

    config_class = GapServeConfig
