"""What serving needs from a GAP checkpoint's config, read with `modeling_gap`'s own config class.

`modeling_gap.GapQwen2_5VLConfig` (the package's; with `--trust-remote-code`, the checkpoint's copy of the same file)
is registered with transformers' `AutoConfig` for `model_type="gap_qwen2_5_vl"` by `import modeling_gap`, so a
checkpoint as `save_pretrained` / `push_to_hub` writes it loads without `--trust-remote-code`. `GapSpec` is the
serving view of it: token ids, K, span rule, feedback.
"""

from dataclasses import dataclass

from modeling_gap import GapQwen2_5VLConfig, GapQwen2_5VLForConditionalGeneration
from modeling_gap.configuration_gap import LATENT_FEEDBACK_MODES, LATENT_SPAN_RULES
from transformers import Qwen2_5_VLModel

MODEL_TYPE = GapQwen2_5VLConfig.model_type
ARCHITECTURE = GapQwen2_5VLForConditionalGeneration.__name__
FEEDBACK_MODES = LATENT_FEEDBACK_MODES
SPAN_RULES = LATENT_SPAN_RULES
INTERVENTIONS = (None, "zero", "drop")
# Spans' worth of latents the store keeps per request unless the config sets `serving_latents_per_request`
# (e.g. `--hf-overrides '{"serving_latents_per_request": 256}'`).
DEFAULT_SPANS_PER_REQUEST = 16  # the interventions serving supports (GAP generate has more)


@dataclass(frozen=True)
class GapSpec:
    """What serving needs from a GAP config: token ids, K, span rule, default feedback."""

    pad_id: int
    start_id: int
    end_id: int
    num_latent_tokens: int
    max_latents: int  # K for "fixed"; latent_max_tokens (default K) for "sampled_end"
    span_rule: str
    feedback: str
    # Latents a request keeps for replay (its latent store row); a span opens only while a whole one still fits.
    latent_capacity: int = 0

    def __post_init__(self):
        if self.latent_capacity <= 0:
            object.__setattr__(self, "latent_capacity", DEFAULT_SPANS_PER_REQUEST * self.max_latents)

    @classmethod
    def from_hf_config(cls, config) -> "GapSpec":
        """From a GAP config: the package's class or the checkpoint's remote-code copy of it (never isinstance-checked:
        the two are different classes)."""
        if any(i is None for i in config.latent_token_ids):
            raise ValueError(
                "This GAP checkpoint's config has no latent token ids (latent_pad_token_id, latent_start_token_id, "
                "latent_end_token_id): convert it with modeling_gap.from_qwen2_5_vl and save it again."
            )
        # The config validated its fields when it was built (`GapQwen2_5VLConfig._validate_gap_fields`).
        pad_id, start_id, end_id = config.latent_token_ids
        return cls(
            pad_id=int(pad_id), start_id=int(start_id), end_id=int(end_id),
            num_latent_tokens=int(config.num_latent_tokens), max_latents=int(config.max_latents_per_span),
            span_rule=config.latent_span_rule, feedback=config.latent_feedback,
            latent_capacity=int(getattr(config, "serving_latents_per_request", 0) or 0),
        )


class GapBackbone(Qwen2_5_VLModel):
    """Qwen2.5-VL's backbone (vision tower + decoder), the class vLLM's Transformers backend builds for a GAP
    config (`AutoModel.from_config`)."""

    config_class = GapQwen2_5VLConfig
