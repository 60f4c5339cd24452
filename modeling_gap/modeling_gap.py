"""GAP on Qwen2.5-VL: the PCA-aligned latent head and the model that reasons with visual latents.

Reads top to bottom: the latent head, the streaming PCA that fits it, target pooling, the output class,
the model (teacher-forced forward; latent-aware `generate` lives in `generation_gap.py`), and the
conversion of a stock Qwen2.5-VL checkpoint.
"""

import contextlib
import importlib
import math
import os
from dataclasses import dataclass
from typing import Iterable

from .transformers_compat import (  # first: below the supported transformers, its one-line error is the first
    MultimodalCausalLMOutputWithPast,
    accepts_cache_alias,
    cache_kwargs,
    encoder_outputs,
    output_cache,
    slice_logits_to_keep,
)

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import can_return_tuple, logging
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from .configuration_gap import GapQwen2_5VLConfig
from .generation_gap import GapGenerationMixin


VARLEN_SDPA = "gap_varlen_sdpa"
# Attention implementations that keep the rows of a padding-free batch apart (transformers builds a block-diagonal
# causal mask from the restarting positions for eager / sdpa / flex, flash-attention runs variable-length kernels,
# and `gap_varlen_sdpa` attends row by row).
PADDING_FREE_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention", VARLEN_SDPA)


def varlen_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  position_ids=None, **kwargs):
    """transformers' sdpa attention, except for padding-free rows (one batch row, text `position_ids` restarting at
    0 where each row starts): there each row attends causally to itself only, one `scaled_dot_product_attention`
    call per row, so no (total, total) mask is built or multiplied (the cost of variable-length kernels, on any
    device). Query / key / value (batch, heads, seq, head_dim); returns (batch, seq, heads, head_dim) as sdpa's."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten().tolist()
    if len(starts) <= 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = starts[1:] + [query.shape[2]]
    rows = [
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                       scale=scaling, is_causal=True)
        for a, b in zip(starts, bounds)
    ]
    return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None


def _register_varlen_sdpa():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention_forward)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)  # padded batches: sdpa's masks


_register_varlen_sdpa()
PCA_SCALE_FLOOR = 1e-2  # smallest per-direction std kept, relative to the largest
# `from_pretrained` options that locate a checkpoint's config (forwarded to read its model type).
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class GapLatentHead(nn.Module):
    """Maps final hidden states to the latent vectors fed back as input embeddings.

    One module for the three feedback modes of `config.latent_feedback`:
    - `"raw"`: `z = h`;
    - `"ema_norm"`: `z = h * ema_norm / ||h||`;
    - `"pca"`: `z = pca_mean + pca_components @ (pca_scale * proj(norm(h)))`.

    Buffers (saved with the weights): `pca_mean` (d,), `pca_components` (d, r) (a parameter when
    `latent_pca_trainable`), `pca_scale` (r,), `ema_norm` () — 0 until calibrated.

    The head holds tensors only: the feedback mode, the loss and the EMA momentum are read from the model's config
    at each call (the model passes them), so a config change reaches every copy of the head (PEFT's
    `modules_to_save` copies it).
    """

    def __init__(self, config: GapQwen2_5VLConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        rank = min(config.latent_pca_rank, hidden_size)
        self.norm = Qwen2_5_VLRMSNorm(hidden_size, eps=config.text_config.rms_norm_eps)
        self.proj = nn.Linear(hidden_size, rank, bias=False)
        self.register_buffer("pca_mean", torch.zeros(hidden_size))
        components = torch.eye(hidden_size, rank)
        if config.latent_pca_trainable:
            self.pca_components = nn.Parameter(components)
        else:
            self.register_buffer("pca_components", components)
        self.register_buffer("pca_scale", torch.ones(rank))
        self.register_buffer("ema_norm", torch.zeros(()))

    @property
    def rank(self) -> int:
        return self.pca_scale.shape[0]

    def init_weights(self):
        """The state of an unfitted head: identity subspace, unit scale, uncalibrated EMA norm. Uses transformers'
        guarded initialisers, so weights loaded from a checkpoint are left alone.

        `proj` is drawn from its own generator seeded with `torch.initial_seed()` (the last `torch.manual_seed`), not
        from the global stream: the model's `__init__` runs this after the stock `post_init` has consumed draws,
        while a load with the head missing (on the meta device, then `_init_weights`) runs it at another point of
        the stream; with its own generator both give the same head for the same seed."""
        init.ones_(self.norm.weight)
        weight = self.proj.weight
        if weight.device.type != "meta":
            generator = torch.Generator(device=weight.device).manual_seed(torch.initial_seed())
            init.normal_(weight, std=1.0 / math.sqrt(self.proj.in_features), generator=generator)
        init.zeros_(self.pca_mean)
        init.copy_(self.pca_components, torch.eye(*self.pca_components.shape, dtype=self.pca_components.dtype,
                                                  device=self.pca_components.device))
        init.ones_(self.pca_scale)
        init.zeros_(self.ema_norm)

    def forward(self, hidden_states: torch.Tensor, feedback: str) -> torch.Tensor:
        """(..., d) final hidden states -> (..., d) latent input embeddings, by `feedback` (`config.latent_feedback`
        or a per-call override)."""
        if feedback == "raw":
            return hidden_states
        if feedback == "ema_norm":
            norm = hidden_states.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            return hidden_states * (self.ema_norm.to(hidden_states.dtype) / norm)
        if feedback == "pca":
            coords = self.proj(self.norm(hidden_states)) * self.pca_scale.to(hidden_states.dtype)
            return self.pca_mean.to(hidden_states.dtype) + coords @ self.pca_components.to(hidden_states.dtype).T
        raise ValueError(f"latent_feedback must be one of 'pca', 'ema_norm', 'raw'; got {feedback!r}.")

    def whiten(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(..., d) embeddings -> (..., r) coordinates in the principal subspace, divided by the per-direction std."""
        centered = embeddings - self.pca_mean.to(embeddings.dtype)
        return (centered @ self.pca_components.to(embeddings.dtype)) / self.pca_scale.to(embeddings.dtype)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d): the orthogonal projection onto the affine principal subspace."""
        mean = self.pca_mean.to(embeddings.dtype)
        components = self.pca_components.to(embeddings.dtype)
        return mean + ((embeddings - mean) @ components) @ components.T

    def teacher_inputs(self, targets: torch.Tensor, feedback: str) -> torch.Tensor:
        """What teacher forcing feeds at the latent slots: in `pca` mode the targets projected onto the subspace,
        so that training inputs match what the head can produce; otherwise the targets themselves."""
        return self.project(targets) if feedback == "pca" else targets

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
        """Latent loss of (n, d) predictions against (n, d) targets, by `kind` (`config.latent_loss`)."""
        predictions, targets = predictions.float(), targets.float()
        cosine = 1 - F.cosine_similarity(predictions, targets, dim=-1).mean()
        if kind == "cos":
            return cosine
        if kind == "mse":
            return F.mse_loss(predictions, targets)
        return F.mse_loss(self.whiten(predictions), self.whiten(targets)) + cosine

    @torch.no_grad()
    def update_ema_norm(self, visual_embeddings: torch.Tensor, momentum: float):
        """Fold the mean norm of (n, d) visual input embeddings into the `ema_norm` buffer with `momentum`
        (`config.latent_ema_momentum`); the first call sets it."""
        if visual_embeddings.numel() == 0:
            return
        mean_norm = visual_embeddings.float().norm(dim=-1).mean().to(self.ema_norm.dtype)
        if self.ema_norm.item() == 0:
            self.ema_norm.copy_(mean_norm)
        else:
            self.ema_norm.mul_(momentum).add_((1 - momentum) * mean_norm)

    @torch.no_grad()
    def set_pca(self, mean: torch.Tensor, components: torch.Tensor, scale: torch.Tensor):
        """Install fitted PCA statistics: mean (d,), components (d, r) orthonormal columns, scale (r,) stds (floored at
        `PCA_SCALE_FLOOR` x the largest)."""
        if components.shape != self.pca_components.shape:
            raise ValueError(
                f"PCA components have shape {tuple(components.shape)}; the head expects {tuple(self.pca_components.shape)}"
                " (hidden size x latent_pca_rank)."
            )
        self.pca_mean.copy_(mean)
        self.pca_components.data.copy_(components)
        # Directions a small calibration set leaves (nearly) empty would make whitening explode: floor the stds.
        self.pca_scale.copy_(scale.clamp_min(PCA_SCALE_FLOOR * scale.max().clamp_min(1e-6)))


class StreamingPCA:
    """Principal components of a stream of (n, d) vectors from accumulated first and second moments (float64).

    `update` takes batches of any size; `compute(rank, method)` returns `(mean (d,), components (d, r), scale (r,))`
    with `method="exact"` (symmetric eigendecomposition) or `"randomized"` (`torch.svd_lowrank`, for large d).
    """

    def __init__(self, dim: int):
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.norm_total = 0.0

    def update(self, vectors: torch.Tensor):
        vectors = vectors.detach().reshape(-1, vectors.shape[-1]).to("cpu", torch.float64)
        self.count += vectors.shape[0]
        self.total += vectors.sum(0)
        self.outer += vectors.T @ vectors
        self.norm_total += vectors.norm(dim=-1).sum().item()

    @property
    def mean_norm(self) -> float:
        return self.norm_total / max(self.count, 1)

    def compute(self, rank: int, method: str = "exact", seed: int = 0):
        if self.count < 2:
            raise ValueError(f"PCA needs at least 2 vectors; got {self.count}. Give more calibration images.")
        mean = self.total / self.count
        covariance = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        rank = min(rank, covariance.shape[0])
        if method == "exact":
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
            order = eigenvalues.argsort(descending=True)[:rank]
            variances, components = eigenvalues[order], eigenvectors[:, order]
        elif method == "randomized":
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            components, variances, _ = torch.svd_lowrank(covariance, q=min(rank + 10, covariance.shape[0]), niter=6)
            torch.random.set_rng_state(generator_state)
            components, variances = components[:, :rank], variances[:rank]
        else:
            raise ValueError(f"method must be 'exact' or 'randomized'; got {method!r}.")
        return mean.float(), components.float(), variances.clamp_min(0).sqrt().float()


def pool_latent_targets(
    visual_embeddings: torch.Tensor, grid_hw: tuple[int, int], num_latents: int, pooling: str = "grid"
) -> torch.Tensor:
    """Pool one image's (n_tokens, d) visual input embeddings, laid out on a (h, w) merged-token grid, to (K, d).

    `"grid"`: adaptive average pooling to a (kh, kw) grid, kh * kw = K, the factorisation closest to the image's
    aspect ratio, read in raster order. `"raster"`: K contiguous raster-order chunks, each mean-pooled.
    """
    height, width = grid_hw
    if visual_embeddings.shape[0] != height * width:
        raise ValueError(f"{visual_embeddings.shape[0]} visual tokens do not fill a {height}x{width} grid.")
    if pooling == "raster":
        return F.adaptive_avg_pool1d(visual_embeddings.T[None], num_latents)[0].T
    if pooling != "grid":
        raise ValueError(f"latent_target_pooling must be 'grid' or 'raster'; got {pooling!r}.")
    factors = [(a, num_latents // a) for a in range(1, num_latents + 1) if num_latents % a == 0]
    kh, kw = min(factors, key=lambda f: abs(math.log(f[0] / f[1]) - math.log(height / width)))
    grid = visual_embeddings.T.reshape(1, -1, height, width)
    return F.adaptive_avg_pool2d(grid, (kh, kw))[0].reshape(visual_embeddings.shape[1], -1).T


@dataclass
class GapCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    """
    Output of [`GapQwen2_5VLForConditionalGeneration`]: the stock multimodal outputs plus

    Args:
        ce_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy on the labelled text tokens (returned when `labels` is given).
        latent_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Loss of the latent head's predictions against the latent targets (returned when the batch has spans).
        latent_predictions (`torch.FloatTensor` of shape `(num_spans, K, hidden_size)`, *optional*):
            The head's output at each latent slot, computed from the hidden state before the slot. A full-sequence
            forward without spans returns it with `num_spans = 0` (the head still ran, see `forward`).
        latent_targets (`torch.FloatTensor` of shape `(num_spans, K, hidden_size)`, *optional*):
            The targets of those slots (spans in batch order: row by row, left to right).
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, kept_length, hidden_size)`):
            The final-layer states the LM head read (sliced like the logits by `logits_to_keep`): what the latent
            head maps to the next latent.
    """

    ce_loss: torch.FloatTensor | None = None
    latent_loss: torch.FloatTensor | None = None
    latent_predictions: torch.FloatTensor | None = None
    latent_targets: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class GapQwen2_5VLForConditionalGeneration(GapGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL that reasons with K continuous visual latents per `<|latent_start|> ... <|latent_end|>` span.

    `forward` is the stock forward plus teacher-forced latent supervision: latent slots (`<|latent_pad|>` ids in
    `input_ids`) receive the latent targets as input embeddings and the latent head's prediction at each slot
    (from the hidden state before it) is regressed on its target, all in one pass. `generate` (from
    [`GapGenerationMixin`]) feeds the head's own outputs back instead.
    """

    config_class = GapQwen2_5VLConfig
    config: GapQwen2_5VLConfig

    def __init__(self, config: GapQwen2_5VLConfig):
        super().__init__(config)
        self.latent_head = GapLatentHead(config)
        self.latent_head.init_weights()
        # `register_for_auto_class` records one auto class per class; this one also loads as a causal LM.
        auto_map = dict(getattr(config, "auto_map", None) or {})
        auto_map.setdefault("AutoModelForCausalLM", f"{_module_leaf(type(self))}.{type(self).__name__}")
        self.config.auto_map = auto_map

    def _init_weights(self, module):
        if isinstance(module, GapLatentHead):
            module.init_weights()
            return
        super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a stock Qwen2.5-VL checkpoint: its weights are stored under
        the stock class's names and it has no latent tokens, so it must be converted with `from_qwen2_5_vl`."""
        config = kwargs.get("config")
        if config is None and pretrained_model_name_or_path is not None:
            hub_options = {k: kwargs[k] for k in _HUB_OPTIONS if k in kwargs}
            config_dict, _ = cls.config_class.get_config_dict(pretrained_model_name_or_path, **hub_options)
            model_type = config_dict.get("model_type")
        else:
            model_type = getattr(config, "model_type", None) if not isinstance(config, (str, os.PathLike)) else None
        if model_type is not None and model_type != cls.config_class.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {model_type!r} checkpoint, not a GAP one "
                f"({cls.config_class.model_type!r}). Convert it first: `model, processor = "
                f"from_qwen2_5_vl({str(pretrained_model_name_or_path)!r}, num_latent_tokens=8, latent_feedback='pca')`, "
                "then `save_pretrained`."
            )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    # ---- latent spans -------------------------------------------------------------------------------------
    def latent_slot_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """(batch, seq) ids -> (batch, seq) True at latent slots. Checks that every span is start + K pads + end."""
        pad_id, start_id, end_id = self.config.latent_token_ids
        if pad_id is None or start_id is None or end_id is None:
            raise ValueError(
                "config.latent_pad_token_id / latent_start_token_id / latent_end_token_id are not set: build the "
                "model with `from_qwen2_5_vl` or set the three ids of the latent tokens."
            )
        slots = input_ids == pad_id
        if not slots.any() and not (input_ids == start_id).any():
            return slots
        k = self.config.num_latent_tokens
        for row, ids in enumerate(input_ids.tolist()):
            starts = [i for i, t in enumerate(ids) if t == start_id]
            n_pads = sum(t == pad_id for t in ids)
            for s in starts:
                if s == len(ids) - 1:
                    continue  # a span opened by the last token (a prompt that ends in latent mode) is fine
                span = ids[s + 1 : s + 2 + k]
                if span[:k] != [pad_id] * k or len(span) <= k or span[k] != end_id:
                    got = next((j for j, t in enumerate(ids[s + 1 :]) if t != pad_id), len(ids) - s - 1)
                    raise ValueError(
                        f"Row {row}: the latent span opened at position {s} has {got} <|latent_pad|> slots "
                        f"{'and no <|latent_end|>' if len(span) <= k or got != k else ''} but "
                        f"config.num_latent_tokens (K) is {k}: a span is <|latent_start|> + K x <|latent_pad|> + "
                        "<|latent_end|> (let the processor expand <|latent|> markers)."
                    )
            complete = len(starts) - (bool(starts) and starts[-1] == len(ids) - 1)
            if n_pads != k * complete:
                raise ValueError(
                    f"Row {row}: {n_pads} <|latent_pad|> slots stand outside complete spans "
                    f"({len(starts)} spans of K={k})."
                )
        return slots

    def _encode_images(self, pixel_values, image_grid_thw, aux_pixel_values=None, aux_image_grid_thw=None):
        """One vision-tower call for the question images and, if given, the aux images.

        Returns `({"image": outputs of the question images}, aux features)`: the aux images' per-image
        `(n_tokens, d)` visual input embeddings, detached (targets carry no gradient), or None.
        """
        if aux_pixel_values is None:
            return {"image": self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)}, None
        if aux_image_grid_thw is None:
            raise ValueError("`aux_pixel_values` needs `aux_image_grid_thw` (one (t, h, w) row per aux image).")
        outputs = self.model.get_image_features(
            torch.cat([pixel_values, aux_pixel_values.to(pixel_values.device, pixel_values.dtype)]),
            torch.cat([image_grid_thw, aux_image_grid_thw.to(image_grid_thw.device)]),
            return_dict=True,
        )
        n_images = image_grid_thw.shape[0]
        aux_features = [f.detach() for f in outputs.pooler_output[n_images:]]
        outputs.pooler_output = outputs.pooler_output[:n_images]
        if outputs.last_hidden_state is not None:  # patch states, one contiguous block per image
            outputs.last_hidden_state = outputs.last_hidden_state[: pixel_values.shape[0]]
        return {"image": outputs}, aux_features

    def encode_latent_targets(
        self, aux_pixel_values: torch.Tensor, aux_image_grid_thw: torch.LongTensor, features=None
    ) -> torch.Tensor:
        """Aux images -> (n_aux, K, d) targets: the model's own visual input embeddings of each image (vision tower
        + merger, no gradient), pooled to K by `config.latent_target_pooling`. `features` (per-image
        `(n_tokens, d)`) skips the vision tower when the images were already encoded."""
        if features is None:
            with torch.no_grad():
                features = self.model.get_image_features(aux_pixel_values, aux_image_grid_thw).pooler_output
        merge = self.config.vision_config.spatial_merge_size
        targets = [
            pool_latent_targets(
                f, (int(thw[1]) // merge, int(thw[2]) // merge), self.config.num_latent_tokens,
                self.config.latent_target_pooling,
            )
            for f, thw in zip(features, aux_image_grid_thw)
        ]
        return torch.stack(targets).detach()

    def _gather_latent_targets(
        self, latent_targets, aux_pixel_values, aux_image_grid_thw, slots, input_ids, aux_features=None
    ):
        """The (n_spans, K, d) targets of the spans in `input_ids`, checked against the spans."""
        k = self.config.num_latent_tokens
        spans_per_row = (slots.sum(-1) // k).tolist()
        n_spans = sum(spans_per_row)
        if latent_targets is None and aux_pixel_values is None:
            if n_spans:
                row = next(i for i, n in enumerate(spans_per_row) if n)
                raise ValueError(
                    f"Row {row} has {spans_per_row[row]} latent span(s) but no latent targets were given: pass "
                    "`latent_targets` (num_spans, K, hidden) or the aux images (`aux_pixel_values`, "
                    "`aux_image_grid_thw`) that the spans stand for."
                )
            return None
        if latent_targets is None:
            if aux_image_grid_thw is None:
                raise ValueError("`aux_pixel_values` needs `aux_image_grid_thw` (one (t, h, w) row per aux image).")
            latent_targets = self.encode_latent_targets(aux_pixel_values, aux_image_grid_thw, aux_features)
        elif isinstance(latent_targets, (list, tuple)):
            per_row = [torch.as_tensor(t) for t in latent_targets]
            if len(per_row) != len(spans_per_row):
                raise ValueError(f"latent_targets has {len(per_row)} rows; the batch has {len(spans_per_row)}.")
            for row, (t, n) in enumerate(zip(per_row, spans_per_row)):
                if t.shape[0] != n:
                    raise ValueError(f"Row {row} has {n} latent span(s) but {t.shape[0]} sets of latent targets.")
            latent_targets = torch.cat([t.reshape(-1, *t.shape[-2:]) for t in per_row]) if per_row else None
        if latent_targets.ndim != 3 or latent_targets.shape[1] != k:
            raise ValueError(
                f"latent_targets must have shape (num_spans, K={k}, hidden); got {tuple(latent_targets.shape)}: "
                "each span's K must equal config.num_latent_tokens."
            )
        if latent_targets.shape[0] != n_spans:
            raise ValueError(
                f"The batch has {n_spans} latent span(s) (per row: {spans_per_row}) but {latent_targets.shape[0]} "
                "sets of latent targets (aux images): give exactly one per span, in row order."
            )
        return latent_targets

    # ---- padding-free batches ------------------------------------------------------------------------------
    def padding_free_position_ids(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        mm_token_type_ids: torch.IntTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """(batch, seq) ids of rows concatenated without padding, with (batch, seq) `position_ids` that restart at 0
        where each row starts (as `DataCollatorWithFlattening` and TRL's padding-free collator give them) ->
        (4, batch, seq) positions: the per-row text positions (transformers reads them to keep attention within each
        row: a block-diagonal causal mask for eager / sdpa / flex attention, variable-length kernels for
        flash-attention), then the three M-RoPE axes computed for each row on its own, exactly as in a padded batch.
        """
        implementation = self.config.text_config._attn_implementation
        if implementation.startswith("paged") or not any(name in implementation for name in PADDING_FREE_ATTENTION):
            raise ValueError(
                f"Padding-free batches need an attention implementation that keeps attention within each row "
                f"({', '.join(PADDING_FREE_ATTENTION)}); this model uses {implementation!r}: load it with one of "
                "those (`attn_implementation=`) or train with padded batches (padding_free=False)."
            )
        position_ids = position_ids.to(input_ids.device)
        starts = position_ids == 0
        if not bool(starts[:, 0].all()):
            raise ValueError("Padding-free position_ids must start at 0 in every batch row (each row restarts at 0).")
        lengths = []  # lengths of the rows, in order, over the whole batch
        for row_starts in starts:
            begin = row_starts.nonzero().flatten().tolist() + [row_starts.shape[0]]
            lengths.extend(b - a for a, b in zip(begin[:-1], begin[1:]))
        if mm_token_type_ids is None or (image_grid_thw is None and video_grid_thw is None):
            rope = position_ids[None].expand(3, -1, -1)
        else:
            # One padded (rows, longest) view, one `get_rope_index` call: it walks the rows and their images in order.
            flat_ids = input_ids.reshape(-1)
            flat_types = mm_token_type_ids.to(input_ids.device).reshape(-1)
            longest = max(lengths)
            padded_ids = flat_ids.new_zeros(len(lengths), longest)
            padded_types = flat_types.new_zeros(len(lengths), longest)
            mask = torch.zeros(len(lengths), longest, dtype=torch.long, device=input_ids.device)
            offset = 0
            for row, length in enumerate(lengths):
                padded_ids[row, :length] = flat_ids[offset : offset + length]
                padded_types[row, :length] = flat_types[offset : offset + length]
                mask[row, :length] = 1
                offset += length
            padded_rope, _ = self.model.get_rope_index(
                padded_ids, mm_token_type_ids=padded_types, image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts, attention_mask=mask,
            )
            rope = padded_rope[:, mask.bool()].reshape(3, *input_ids.shape)
        return torch.cat([position_ids[None], rope.to(position_ids.dtype)])

    # ---- forward ------------------------------------------------------------------------------------------
    @can_return_tuple
    @accepts_cache_alias
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        latent_targets: torch.Tensor | list[torch.Tensor] | None = None,
        aux_pixel_values: torch.Tensor | None = None,
        aux_image_grid_thw: torch.LongTensor | None = None,
        latent_inputs: torch.Tensor | None = None,
        **kwargs,
    ) -> GapCausalLMOutputWithPast:
        r"""
        The stock Qwen2.5-VL forward, plus:

        latent_targets (`torch.FloatTensor` of shape `(num_spans, K, hidden_size)` or a list of per-row
            `(num_spans_i, K, hidden_size)`, *optional*): targets of the latent spans in `input_ids`, spans in
            batch order (row by row, left to right).
        aux_pixel_values (`torch.FloatTensor` of shape `(num_aux_patches, patch_dim)`, *optional*) and
        aux_image_grid_thw (`torch.LongTensor` of shape `(num_aux_images, 3)`, *optional*): one aux image per
            span, encoded by the model's own vision tower and pooled to K targets (used when `latent_targets`
            is not given).
        latent_inputs (`torch.FloatTensor` of shape `(num_spans, K, hidden_size)`, *optional*): what to feed at the
            latent slots instead of the (projected) targets, e.g. closed-loop latents from
            [`~GapQwen2_5VLForConditionalGeneration.closed_loop_latent_inputs`]; the loss still regresses on targets.

        Padding-free batches (rows concatenated into one batch row, no `attention_mask`, (1, total) `position_ids`
        restarting at 0 at each row): each row's M-RoPE positions are computed on its own and attention stays within
        rows (`padding_free_position_ids`); spans and targets are per row as in a padded batch.

        Returns `loss = ce_loss + config.latent_loss_weight * latent_loss`, `ce_loss`, `latent_loss`,
        `latent_predictions`, `latent_targets` and the stock outputs.
        """
        slots = targets = aux_features = None
        if input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            slots = self.latent_slot_mask(input_ids)
            packed = position_ids is not None and position_ids.ndim == 2 and bool((position_ids[:, 1:] == 0).any())
            if attention_mask is None and position_ids is not None and position_ids.ndim == 2 and (
                packed or not use_cache
            ):
                # Padding-free rows (concatenated, positions restarting per row; or one row in training, without a
                # cache): per-row M-RoPE positions. A 2-D prefill that keeps a cache and has one row per batch row
                # is left to the stock forward.
                position_ids = self.padding_free_position_ids(
                    input_ids, position_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts
                )
                use_cache = False  # transformers keeps the rows apart only without a cache
                if self.config.text_config._attn_implementation == VARLEN_SDPA:  # row by row: no (total, total) mask
                    attention_mask = {kind: None for kind in set(self.config.text_config.layer_types)}
        encode_aux = slots is not None and latent_targets is None and aux_pixel_values is not None
        if pixel_values is not None and mm_encoder_outputs is None:
            mm_encoder_outputs, aux_features = self._encode_images(
                pixel_values, image_grid_thw, aux_pixel_values if encode_aux else None, aux_image_grid_thw
            )
            pixel_values = None
            if self.training:
                visual = torch.cat(mm_encoder_outputs["image"].pooler_output).detach()
                self.latent_head.update_ema_norm(visual, self.config.latent_ema_momentum)
        if slots is not None:
            targets = self._gather_latent_targets(
                latent_targets, aux_pixel_values, aux_image_grid_thw, slots, input_ids, aux_features
            )
        has_spans = targets is not None and targets.shape[0] > 0

        # Sharded training (ZeRO-3, FSDP) gathers a module's weights when it is called, and every rank must call the
        # same modules in the same order: the embedding is looked up here whether or not this batch has spans.
        if slots is not None and inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if has_spans:
            targets = targets.to(inputs_embeds.device, inputs_embeds.dtype)
            fed = latent_inputs
            if fed is None:
                fed = self.latent_head.teacher_inputs(targets, self.config.latent_feedback)
            if fed.shape != targets.shape:
                raise ValueError(f"latent_inputs has shape {tuple(fed.shape)}; the spans need {tuple(targets.shape)}.")
            fed = fed.to(inputs_embeds.device, inputs_embeds.dtype).reshape(-1, inputs_embeds.shape[-1])
            inputs_embeds = inputs_embeds.masked_scatter(slots[..., None].to(inputs_embeds.device), fed)

        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            mm_token_type_ids=mm_token_type_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **cache_kwargs(cache),
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        kept_hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(kept_hidden_states)

        ce_loss = None
        if labels is not None:
            labels = labels.masked_fill(labels == self.config.latent_pad_token_id, -100)
            ce_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        latent_loss = latent_predictions = None
        if has_spans:
            # The state before slot p (at p - 1) predicts slot p, exactly as in generation.
            previous = torch.roll(slots, shifts=-1, dims=1).to(hidden_states.device)
            weight = self.config.latent_loss_weight
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                predictions = self.latent_head(hidden_states[previous], self.config.latent_feedback)
                latent_predictions = predictions.reshape(targets.shape)
                latent_loss = self.latent_head.loss(
                    latent_predictions.flatten(0, 1), targets.flatten(0, 1), self.config.latent_loss
                )
            if weight == 0:
                latent_loss = latent_loss.detach()
        elif slots is not None:
            # No span here, but maybe on another rank: run the head on no rows, so that every rank calls it (and, in
            # training, its weights get a zero gradient) whatever its batch holds.
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.latent_loss_weight > 0):
                empty = self.latent_head(hidden_states[:, :0].flatten(0, 1), self.config.latent_feedback)
            latent_predictions = empty.reshape(0, self.config.num_latent_tokens, empty.shape[-1])

        loss = ce_loss
        if latent_loss is not None and self.config.latent_loss_weight > 0:
            weighted = self.config.latent_loss_weight * latent_loss
            loss = weighted if loss is None else loss + weighted

        return GapCausalLMOutputWithPast(
            loss=loss,
            ce_loss=ce_loss,
            latent_loss=latent_loss,
            latent_predictions=latent_predictions,
            latent_targets=targets if has_spans else None,
            logits=logits,
            last_hidden_state=kept_hidden_states,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_kwargs(output_cache(outputs)),
            **encoder_outputs(outputs, mm_encoder_outputs),
        )


    @torch.no_grad()
    def closed_loop_latent_inputs(self, num_passes: int | None = None, **batch) -> torch.Tensor | None:
        """The (num_spans, K, d) latents the model itself would feed at the slots of `batch` (closed loop).

        A slot's latent depends only on the slots before it, so n teacher-forced passes (n = most slots in a row),
        each feeding the head's predictions of the previous pass, reach exactly what a step-by-step closed loop feeds
        (no gradient).
        Feed the result as `latent_inputs` to train with `latent_feedback_training="self"`. `num_passes` overrides n
        (sharded training passes the most over all ranks, so that every rank runs as many forwards).
        """
        batch = {k: v for k, v in batch.items() if k not in ("labels", "latent_inputs")}
        outputs = self(**batch)
        has_spans = outputs.latent_loss is not None
        passes = int(self.latent_slot_mask(batch["input_ids"]).sum(-1).max()) if num_passes is None else num_passes
        batch = {k: v for k, v in batch.items() if k not in ("aux_pixel_values", "aux_image_grid_thw")}
        batch["latent_targets"] = outputs.latent_targets
        for _ in range(passes - 1):
            outputs = self(**batch, latent_inputs=outputs.latent_predictions if has_spans else None)
        return outputs.latent_predictions.detach() if has_spans else None


def _module_leaf(cls) -> str:
    return cls.__module__.split(".")[-1]


# ---- fitting the head and converting stock checkpoints -----------------------------------------------------
def gathered_parameters(params: Iterable[nn.Parameter], modifier_rank: int | None = None):
    """A context in which DeepSpeed ZeRO-3 partitioned `params` are whole (`deepspeed.zero.GatheredParameters`;
    with `modifier_rank`, what that rank writes is partitioned back); a no-op for ordinary parameters. For work on
    weights outside a module's own forward: the PCA fit, conversion."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    # Not an import statement: transformers reads the remote code's imports and would require DeepSpeed of every user.
    deepspeed = importlib.import_module("deepspeed")
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


@torch.no_grad()
def visual_input_embeddings(model, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor) -> torch.Tensor:
    """(n_tokens, d): what fills the `<|image_pad|>` slots for these images (vision tower + merger)."""
    device = model.model.visual.patch_embed.proj.weight.device
    with gathered_parameters(model.model.visual.parameters()):
        features = model.model.get_image_features(pixel_values.to(device), image_grid_thw.to(device)).pooler_output
    return torch.cat(features)


@torch.no_grad()
def fit_latent_head_pca(
    model: GapQwen2_5VLForConditionalGeneration,
    calibration: Iterable,
    image_processor=None,
    rank: int | None = None,
    method: str = "exact",
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Fit the latent head's `pca_mean`, `pca_components`, `pca_scale` (and `ema_norm`) on calibration images.

    `calibration` streams any of: PIL images (then `image_processor` is needed), dicts with `pixel_values` and
    `image_grid_thw`, or (n, d) tensors of visual input embeddings. Only the (d, d) moments stay in memory.
    `method` is `"exact"` or `"randomized"`. Returns the statistics and the count of vectors seen.
    """
    head = model.latent_head
    rank = rank or head.rank
    if rank != head.rank:
        raise ValueError(f"rank={rank} differs from the head's rank {head.rank} (config.latent_pca_rank, capped at d).")
    pca = StreamingPCA(head.pca_mean.shape[0])
    pending = []

    def flush():
        if pending:
            batch = image_processor(images=list(pending), return_tensors="pt")
            pca.update(visual_input_embeddings(model, batch["pixel_values"], batch["image_grid_thw"]))
            pending.clear()

    iterator = calibration
    if progress:
        iterator = logging.tqdm(calibration, desc="PCA calibration")
    was_training = model.training
    model.eval()
    for item in iterator:
        if isinstance(item, torch.Tensor):
            pca.update(item)
        elif isinstance(item, dict) or hasattr(item, "keys"):
            pca.update(visual_input_embeddings(model, item["pixel_values"], item["image_grid_thw"]))
        else:
            if image_processor is None:
                raise ValueError("Calibration images need `image_processor` (e.g. `processor.image_processor`).")
            pending.extend(item if isinstance(item, (list, tuple)) else [item])
            if len(pending) >= batch_size:
                flush()
    flush()
    model.train(was_training)
    mean, components, scale = pca.compute(rank, method)
    device = head.pca_mean.device
    # Every rank fits the same statistics (the same calibration rows): rank 0's write is kept.
    with gathered_parameters(head.parameters(), modifier_rank=0):
        head.set_pca(mean.to(device), components.to(device), scale.to(device))
    head.ema_norm.fill_(pca.mean_norm)
    return {"mean": mean, "components": components, "scale": scale, "count": pca.count, "mean_norm": pca.mean_norm}


def add_latent_tokens(tokenizer, tokens=None) -> tuple[int, int, int]:
    """Add the latent tokens that are missing, as special tokens, in the given order (default GAP's: pad, start, end);
    return the ids of (pad, start, end). Tokens already present keep their ids."""
    from .configuration_gap import LATENT_PRESETS

    preset = LATENT_PRESETS["gap"] if tokens is None else tokens
    order = preset["added"]
    vocab = tokenizer.get_vocab()
    missing = [t for t in order if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    names = (preset["latent_pad_token"], preset["latent_start_token"], preset["latent_end_token"])
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in names)


# GAP config fields that a re-configuration may not change: they define the tokens or the head's shape.
_FIXED_GAP_FIELDS = (
    "latent_preset", "latent_pad_token", "latent_start_token", "latent_end_token", "latent_pad_token_id",
    "latent_start_token_id", "latent_end_token_id", "latent_pca_rank", "latent_pca_trainable",
)


# Stock Qwen2.5-VL checkpoints on the Hub (and those transformers saves) name the weights as transformers 4.x did
# (`model.layers...`, `visual...`); the stock class maps them by its model type, which the GAP class does not share.
STOCK_KEY_MAPPING = {r"^visual": "model.visual", r"^model(?!\.(language_model|visual))": "model.language_model"}


@contextlib.contextmanager
def _expected_missing_keys(model_class, patterns: list[str]):
    """Load `model_class` without reporting `patterns` as missing (the latent head a stock checkpoint lacks)."""
    saved = model_class._keys_to_ignore_on_load_missing
    model_class._keys_to_ignore_on_load_missing = [*(saved or []), *patterns]
    try:
        yield
    finally:
        model_class._keys_to_ignore_on_load_missing = saved


def _is_gap_checkpoint(path) -> bool:
    if not (isinstance(path, (str, bytes)) or hasattr(path, "__fspath__")):
        return False
    config_dict, _ = GapQwen2_5VLConfig.get_config_dict(str(path))
    return config_dict.get("model_type") == GapQwen2_5VLConfig.model_type


def _reconfigure_gap(model_or_path, processor, preset, gap_options):
    """`from_qwen2_5_vl` on a GAP checkpoint: load it and set `gap_options` on its config and processor."""
    from .processing_gap import GapQwen2_5VLProcessor

    if isinstance(model_or_path, GapQwen2_5VLForConditionalGeneration):
        model = model_or_path
        if processor is None:
            raise ValueError("Re-configuring an in-memory GAP model needs its `processor`.")
    else:
        path = str(model_or_path)
        model = GapQwen2_5VLForConditionalGeneration.from_pretrained(
            path, dtype=gap_options.pop("dtype", "auto"), **(gap_options.pop("load_options", None) or {})
        )
        processor = processor or GapQwen2_5VLProcessor.from_pretrained(path)
    fixed = [k for k in _FIXED_GAP_FIELDS if k in gap_options and gap_options[k] != getattr(model.config, k)]
    if preset is not None and preset != model.config.latent_preset:
        fixed.insert(0, "preset")
    if fixed:
        raise ValueError(
            f"{model_or_path if not isinstance(model_or_path, torch.nn.Module) else 'This model'} is already a GAP "
            f"model (preset {model.config.latent_preset!r}); {', '.join(fixed)} cannot change on it: they define "
            "its latent tokens or the latent head's shape. Convert the stock Qwen2.5-VL checkpoint it came from "
            "instead, or leave those options out to change only K, the feedback or the span rule."
        )
    unknown = [k for k in gap_options if not hasattr(model.config, k)]
    if unknown:
        raise ValueError(f"Unknown GAP option(s) {unknown}: pass fields of GapQwen2_5VLConfig.")
    for key, value in gap_options.items():
        setattr(model.config, key, value)
    model.config._validate_gap_fields()
    processor.num_latent_tokens = model.config.num_latent_tokens
    return model, processor


def from_qwen2_5_vl(base_model_or_path, processor=None, preset: str | None = None, **gap_options):
    """Turn a Qwen2.5-VL checkpoint (a model, or a path / repo id) into a GAP model; its weights stay untouched.

    `preset` names whose tokens and span rule to follow: `"gap"` (default), or `"monet"`, `"mirage"`, `"lvr"` for
    those systems' checkpoints (stock Qwen2.5-VL weights plus their added tokens). The preset's tokens that the
    tokenizer lacks are added in that system's order (GAP's: pad, start, end, which gives Mirage's ids on the real
    tokenizer); the embeddings are resized only if the vocabulary is full. `gap_options` are fields of
    [`GapQwen2_5VLConfig`] (e.g. `num_latent_tokens=8`, `latent_feedback="raw" | "ema_norm" | "pca"`) and win over the
    preset. `processor` defaults to the one saved at the path. Returns `(model, processor)`, the processor a
    [`GapQwen2_5VLProcessor`].

    From a path, `dtype` and `load_options` (other `from_pretrained` keyword arguments: `revision`,
    `attn_implementation`, `use_safetensors`, ...) are used to load it; the stock weights are loaded straight into the
    GAP class, so that under DeepSpeed ZeRO-3 they are partitioned as they load.

    Given a GAP checkpoint (or model), it is re-configured instead: `gap_options` set the fields that leave the
    weights valid (K, feedback, span rule, loss settings) and the fitted latent head is kept; a change of preset,
    latent tokens or PCA rank is refused (those need a conversion from the stock checkpoint).
    """
    from .configuration_gap import LATENT_PRESETS
    from .processing_gap import GapQwen2_5VLProcessor

    if isinstance(base_model_or_path, GapQwen2_5VLForConditionalGeneration) or _is_gap_checkpoint(base_model_or_path):
        return _reconfigure_gap(base_model_or_path, processor, preset, gap_options)
    preset = preset or "gap"
    if preset not in LATENT_PRESETS:
        raise ValueError(f"preset must be one of {tuple(LATENT_PRESETS)}; got {preset!r}.")
    preset_fields = {k: v for k, v in LATENT_PRESETS[preset].items() if k != "added"}
    options = {**preset_fields, "latent_preset": preset, **gap_options}
    tokens = {
        "added": LATENT_PRESETS[preset]["added"],
        **{k: options[k] for k in ("latent_pad_token", "latent_start_token", "latent_end_token")},
    }
    processor_options = {
        k: options[k] for k in ("num_latent_tokens", "latent_pad_token", "latent_start_token", "latent_end_token")
    }

    path = None
    if isinstance(base_model_or_path, (str, bytes)) or hasattr(base_model_or_path, "__fspath__"):
        path = str(base_model_or_path)
        if processor is None:
            processor = GapQwen2_5VLProcessor.from_stock_pretrained(path, processor_options)
    else:
        base = base_model_or_path
        if processor is None:
            raise ValueError("Converting an in-memory model needs its `processor` (or tokenizer's processor).")
        if any(hasattr(p, "ds_id") for p in base.parameters()):
            raise ValueError(
                "This Qwen2.5-VL is partitioned by DeepSpeed ZeRO-3: convert it from its path instead "
                "(`from_qwen2_5_vl(path, processor)`), which loads the stock weights straight into the GAP model."
            )
    if not isinstance(processor, GapQwen2_5VLProcessor):
        processor = GapQwen2_5VLProcessor.from_stock(processor, **processor_options)
    for key, value in processor_options.items():
        setattr(processor, key, value)

    pad_id, start_id, end_id = add_latent_tokens(processor.tokenizer, tokens)
    dtype = options.pop("dtype", "auto")
    load_options = options.pop("load_options", None) or {}
    stock_config = (
        Qwen2_5_VLForConditionalGeneration.config_class.from_pretrained(path, **{
            k: v for k, v in load_options.items() if k in _HUB_OPTIONS})
        if path is not None else base.config
    )
    config_dict = stock_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        config_dict.pop(key, None)
    config = GapQwen2_5VLConfig(
        **config_dict,
        **options,
        latent_pad_token_id=pad_id,
        latent_start_token_id=start_id,
        latent_end_token_id=end_id,
    )

    if path is not None:
        # The stock checkpoint's weights have the GAP model's names (the GAP class adds only the latent head), so
        # transformers loads them itself: under ZeRO-3 straight into partitioned weights, the head initialised.
        # `from_pretrained` initialises the missing head with `GapLatentHead.init_weights`, whose own generator gives
        # the same head with and without ZeRO-3 (there on rank 0 only) for the same seed.
        with _expected_missing_keys(GapQwen2_5VLForConditionalGeneration, [r"^latent_head\."]):
            model = GapQwen2_5VLForConditionalGeneration.from_pretrained(
                path, config=config, dtype=dtype, key_mapping=STOCK_KEY_MAPPING, **load_options
            )
        # Saved, it is a GAP checkpoint with the GAP model's own names: the stock renaming is not reverted on save.
        model._weight_conversions = []
        if len(processor.tokenizer) > config.text_config.vocab_size:
            model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
        return model, processor

    dtype = next(base.parameters()).dtype
    device = next(base.parameters()).device
    with torch.device("meta"):
        model = GapQwen2_5VLForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False, assign=True)
    if unexpected or any(not k.startswith("latent_head.") for k in missing):
        raise RuntimeError(f"Stock weights do not fit the GAP model: missing {missing}, unexpected {unexpected}.")
    # Non-persistent buffers (rotary frequencies) are not in the state dict: share the stock ones.
    for name, buffer in base.named_buffers():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    model.latent_head = GapLatentHead(config).to(device=device, dtype=dtype)
    model.latent_head.init_weights()
    model.tie_weights()
    model.generation_config = base.generation_config
    if len(processor.tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    return model.eval() if not base.training else model, processor


__all__ = [
    "GapCausalLMOutputWithPast",
    "GapLatentHead",
    "GapQwen2_5VLForConditionalGeneration",
    "StreamingPCA",
    "VARLEN_SDPA",
    "add_latent_tokens",
    "fit_latent_head_pca",
    "from_qwen2_5_vl",
    "pool_latent_targets",
]
