"""Latent-aware generation for GAP models (filled in by the generation issue)."""


class GapGenerationMixin:
    pass
