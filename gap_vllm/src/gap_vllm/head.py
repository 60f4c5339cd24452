"""The latent head's inference math (GAP_SPEC section 3), a minimal copy of `modeling_gap.GapLatentHead.forward`.

`raw`: z = h; `ema_norm`: z = h * ema_norm / ||h||; `pca`: z = mu + U_r @ (s_r * A(RMSNorm(h))). The tensors are
loaded from the checkpoint under the same names (`latent_head.norm.weight`, `latent_head.proj.weight`,
`latent_head.pca_mean`, `latent_head.pca_components`, `latent_head.pca_scale`, `latent_head.ema_norm`).
"""

import torch
import torch.nn as nn


class _RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # as Qwen2_5_VLRMSNorm in transformers
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LatentHead(nn.Module):
    def __init__(self, hidden_size: int, rank: int, eps: float):
        super().__init__()
        self.norm = _RMSNorm(hidden_size, eps)
        self.proj = nn.Linear(hidden_size, rank, bias=False)
        self.register_buffer("pca_mean", torch.zeros(hidden_size))
        self.register_buffer("pca_components", torch.eye(hidden_size, rank))
        self.register_buffer("pca_scale", torch.ones(rank))
        self.register_buffer("ema_norm", torch.zeros(()))

    def forward(self, hidden: torch.Tensor, feedback: str) -> torch.Tensor:
        if feedback == "raw":
            return hidden
        if feedback == "ema_norm":
            norm = hidden.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            return hidden * (self.ema_norm.to(hidden.dtype) / norm)
        if feedback == "pca":
            coords = self.proj(self.norm(hidden)) * self.pca_scale.to(hidden.dtype)
            return self.pca_mean.to(hidden.dtype) + coords @ self.pca_components.to(hidden.dtype).T
        raise ValueError(f"latent_feedback must be one of 'pca', 'ema_norm', 'raw'; got {feedback!r}.")
