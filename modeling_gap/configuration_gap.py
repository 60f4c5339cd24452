"""Configuration of a GAP (Granular Alignment Paradigm) visual-latent Qwen2.5-VL model."""

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
    def latent_token_ids(self) -> tuple[int | None, int | None, int | None]:
        """(pad, start, end) ids of the latent tokens."""
        return self.latent_pad_token_id, self.latent_start_token_id, self.latent_end_token_id


__all__ = ["GapQwen2_5VLConfig"]
