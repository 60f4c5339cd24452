"""Configuration of a GAP (Granular Alignment Paradigm) visual-latent Qwen2.5-VL model."""

from .transformers_compat import SUPPORTED_RANGE  # noqa: F401  (first: the supported-version check)

from transformers import Qwen2_5_VLConfig

LATENT_FEEDBACK_MODES = ("pca", "ema_norm", "raw")
LATENT_LOSSES = ("mse_whitened+cos", "mse", "cos")
LATENT_TARGET_POOLINGS = ("grid", "raster")

# GAP's latent tokens are Mirage's strings, added in Mirage's order (pad, start, end) so that on the
# real Qwen2.5-VL tokenizer they receive Mirage's ids 151665, 151666, 151667.
LATENT_PAD_TOKEN = "<|latent_pad|>"
LATENT_START_TOKEN = "<|latent_start|>"
LATENT_END_TOKEN = "<|latent_end|>"
LATENT_MARKER = "<|latent|>"
LATENT_SPAN_RULES = ("fixed", "sampled_end")
# Probing interventions of `generate(latent_intervention=...)`: None (as trained), zeros, noise at each latent's norm,
# one fixed permutation of the coordinates, the mean visual embedding, or never opening a span.
LATENT_INTERVENTIONS = (None, "zero", "noise", "shuffle", "mean", "drop")

# How each public system marks and ends a latent span (GAP_SPEC.md section 9, read from their released code).
# `added`: every token that system adds, in its order, so that a tokenizer missing them gets that system's ids.
LATENT_PRESETS = {
    "gap": dict(
        latent_pad_token=LATENT_PAD_TOKEN, latent_start_token=LATENT_START_TOKEN, latent_end_token=LATENT_END_TOKEN,
        added=[LATENT_PAD_TOKEN, LATENT_START_TOKEN, LATENT_END_TOKEN], latent_span_rule="fixed",
        num_latent_tokens=8,
    ),
    "monet": dict(  # K = 8 in SFT, 10 at inference; the end token is forced after K
        latent_pad_token="<abs_vis_token_pad>", latent_start_token="<abs_vis_token>",
        latent_end_token="</abs_vis_token>",
        added=["<abs_vis_token_pad>", "<abs_vis_token>", "</abs_vis_token>", "<observation>", "</observation>"],
        latent_span_rule="fixed", num_latent_tokens=10,
    ),
    "mirage": dict(  # K = 4 in training; at inference the end token is sampled, or forced after 8
        latent_pad_token=LATENT_PAD_TOKEN, latent_start_token=LATENT_START_TOKEN, latent_end_token=LATENT_END_TOKEN,
        added=[LATENT_PAD_TOKEN, LATENT_START_TOKEN, LATENT_END_TOKEN], latent_span_rule="sampled_end",
        num_latent_tokens=4, latent_max_tokens=8,
    ),
    "lvr": dict(  # a step quota (4, 8 or 16 latents), then the end token
        latent_pad_token="<|lvr|>", latent_start_token="<|lvr_start|>", latent_end_token="<|lvr_end|>",
        added=["<|lvr_start|>", "<|lvr|>", "<|lvr_latent_end|>", "<|lvr_end|>"], latent_span_rule="fixed",
        num_latent_tokens=8,
    ),
}


class GapQwen2_5VLConfig(Qwen2_5_VLConfig):
    r"""
    Configuration of [`GapQwen2_5VLForConditionalGeneration`]: a stock [`Qwen2_5_VLConfig`] plus the fields of
    GAP's latent reasoning. Every stock field keeps its meaning.

    Args:
        num_latent_tokens (`int`, *optional*, defaults to 8):
            K, the number of continuous latent slots in one span `<|latent_start|> K x <|latent_pad|>
            <|latent_end|>`. Must be >= 1.
        latent_feedback (`str`, *optional*, defaults to `"pca"`):
            What a latent slot is fed at inference, computed from the final hidden state h before it:
            `"pca"` (GAP's PCA-aligned head: `mu + U_r @ (s_r * A(RMSNorm(h)))`), `"ema_norm"` (h rescaled to
            the EMA norm of visual input embeddings; training-free) or `"raw"` (h itself, output-as-input).
        latent_pca_rank (`int`, *optional*, defaults to 256):
            r, the rank of the principal subspace of visual input embeddings; capped at the text hidden size.
            Must be >= 1.
        latent_pca_trainable (`bool`, *optional*, defaults to `False`):
            Whether the principal directions U_r are trained (a parameter) or frozen (a buffer).
        latent_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the latent loss in `loss = ce_loss + latent_loss_weight * latent_loss`. Must be >= 0;
            0 leaves the latent head without gradient.
        latent_loss (`str`, *optional*, defaults to `"mse_whitened+cos"`):
            `"mse_whitened+cos"` (MSE in whitened PCA coordinates plus 1 - cosine in embedding space),
            `"mse"` (MSE in embedding space) or `"cos"` (1 - cosine).
        latent_ema_momentum (`float`, *optional*, defaults to 0.99):
            Momentum of the EMA of visual input-embedding norms (the `ema_norm` buffer), in [0, 1).
        latent_target_pooling (`str`, *optional*, defaults to `"grid"`):
            How an aux image's visual tokens are pooled to K targets: `"grid"` (adaptive average pooling over
            the 2-D token grid) or `"raster"` (K raster-order chunks, each mean-pooled, as Mirage does).
        latent_span_rule (`str`, *optional*, defaults to `"fixed"`):
            How generation ends a span: `"fixed"` (exactly K latents, then `<|latent_end|>` is forced) or
            `"sampled_end"` (the span ends when the end token is the next token, or is forced after
            `latent_max_tokens` latents; Mirage's rule).
        latent_max_tokens (`int`, *optional*):
            Most latents in a `"sampled_end"` span (defaults to K). Must be >= 1.
        latent_preset (`str`, *optional*, defaults to `"gap"`):
            Which system's tokens and span rule this checkpoint follows: `"gap"`, `"monet"`, `"mirage"` or `"lvr"`.
        latent_pad_token (`str`, *optional*, defaults to `"<|latent_pad|>"`):
            The token string of a latent slot (Monet: `<abs_vis_token_pad>`, LVR: `<|lvr|>`).
        latent_start_token (`str`, *optional*, defaults to `"<|latent_start|>"`):
            The token string that opens a span (Monet: `<abs_vis_token>`, LVR: `<|lvr_start|>`).
        latent_end_token (`str`, *optional*, defaults to `"<|latent_end|>"`):
            The token string that closes a span (Monet: `</abs_vis_token>`, LVR: `<|lvr_end|>`).
        latent_pad_token_id (`int`, *optional*):
            Id of `<|latent_pad|>`, the placeholder of one latent slot.
        latent_start_token_id (`int`, *optional*):
            Id of `<|latent_start|>`, which opens a span.
        latent_end_token_id (`int`, *optional*):
            Id of `<|latent_end|>`, which closes a span.
    """

    model_type = "gap_qwen2_5_vl"

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
    latent_pad_token: str = LATENT_PAD_TOKEN
    latent_start_token: str = LATENT_START_TOKEN
    latent_end_token: str = LATENT_END_TOKEN
    latent_pad_token_id: int | None = None
    latent_start_token_id: int | None = None
    latent_end_token_id: int | None = None

    def __post_init__(self, **kwargs):
        self._validate_gap_fields()
        super().__post_init__(**kwargs)

    def _validate_gap_fields(self):
        def fail(field, allowed):
            raise ValueError(
                f"GapQwen2_5VLConfig.{field} must be {allowed}; got {getattr(self, field)!r}."
            )

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not (is_int(self.num_latent_tokens) and self.num_latent_tokens >= 1):
            fail("num_latent_tokens", "an integer >= 1")
        if self.latent_feedback not in LATENT_FEEDBACK_MODES:
            fail("latent_feedback", f"one of {LATENT_FEEDBACK_MODES}")
        if not (is_int(self.latent_pca_rank) and self.latent_pca_rank >= 1):
            fail("latent_pca_rank", "an integer >= 1")
        if not isinstance(self.latent_pca_trainable, bool):
            fail("latent_pca_trainable", "a bool")
        if not (is_number(self.latent_loss_weight) and self.latent_loss_weight >= 0):
            fail("latent_loss_weight", "a number >= 0")
        if self.latent_loss not in LATENT_LOSSES:
            fail("latent_loss", f"one of {LATENT_LOSSES}")
        if not (is_number(self.latent_ema_momentum) and 0 <= self.latent_ema_momentum < 1):
            fail("latent_ema_momentum", "a number in [0, 1)")
        if self.latent_target_pooling not in LATENT_TARGET_POOLINGS:
            fail("latent_target_pooling", f"one of {LATENT_TARGET_POOLINGS}")
        if self.latent_span_rule not in LATENT_SPAN_RULES:
            fail("latent_span_rule", f"one of {LATENT_SPAN_RULES}")
        if self.latent_max_tokens is not None and not (is_int(self.latent_max_tokens) and self.latent_max_tokens >= 1):
            fail("latent_max_tokens", "None or an integer >= 1")
        if self.latent_preset not in LATENT_PRESETS:
            fail("latent_preset", f"one of {tuple(LATENT_PRESETS)}")
        tokens = [self.latent_pad_token, self.latent_start_token, self.latent_end_token]
        for field, token in zip(("latent_pad_token", "latent_start_token", "latent_end_token"), tokens):
            if not (isinstance(token, str) and token):
                fail(field, "a non-empty token string")
        if len(set(tokens)) != 3:
            fail("latent_end_token", "different from latent_pad_token and latent_start_token")
        ids = {}
        for field in ("latent_pad_token_id", "latent_start_token_id", "latent_end_token_id"):
            value = getattr(self, field)
            if value is not None and not (is_int(value) and value >= 0):
                fail(field, "None or a token id >= 0")
            if value is not None:
                if value in ids:
                    fail(field, f"distinct from {ids[value]} ({value})")
                ids[value] = field

    @property
    def max_latents_per_span(self) -> int:
        """K for the `"fixed"` rule; `latent_max_tokens` (default K) for `"sampled_end"`."""
        if self.latent_span_rule == "sampled_end":
            return self.latent_max_tokens or self.num_latent_tokens
        return self.num_latent_tokens

    @property
    def latent_token_ids(self) -> tuple[int | None, int | None, int | None]:
        """(pad, start, end) ids of the latent tokens."""
        return self.latent_pad_token_id, self.latent_start_token_id, self.latent_end_token_id


__all__ = [
    "LATENT_END_TOKEN",
    "LATENT_FEEDBACK_MODES",
    "LATENT_INTERVENTIONS",
    "LATENT_LOSSES",
    "LATENT_MARKER",
    "LATENT_PAD_TOKEN",
    "LATENT_PRESETS",
    "LATENT_SPAN_RULES",
    "LATENT_START_TOKEN",
    "LATENT_TARGET_POOLINGS",
    "GapQwen2_5VLConfig",
]
