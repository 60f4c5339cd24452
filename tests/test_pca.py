"""Fitting the PCA-aligned head: the subspace of planted low-rank data, and the scale of the head's outputs."""

import math

import torch

from testing_utils import COLORS, solid_image
from modeling_gap import StreamingPCA, fit_latent_head_pca


def _principal_angles(a, b):
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return torch.arccos(cosines)


def test_planted_subspace_is_recovered_exact_and_randomized():
    generator = torch.Generator().manual_seed(0)
    dim, rank, n = 48, 5, 4000
    basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))
    stds = torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0], dtype=torch.float64)
    mean = torch.randn(dim, generator=generator, dtype=torch.float64)
    pca = StreamingPCA(dim)
    for _ in range(8):  # streamed in batches
        coords = torch.randn(n // 8, rank, generator=generator, dtype=torch.float64) * stds
        pca.update(mean + coords @ basis.T + 1e-5 * torch.randn(n // 8, dim, generator=generator, dtype=torch.float64))
    for method in ("exact", "randomized"):
        fitted_mean, components, scale = pca.compute(rank, method)
        angles = _principal_angles(components, basis)
        assert angles.max() < 1e-3, (method, angles)
        assert torch.allclose(fitted_mean.double(), mean, atol=0.5)
        assert torch.allclose(components.T @ components, torch.eye(rank), atol=1e-4)
        assert (scale[:-1] >= scale[1:]).all()  # sorted by variance
        assert torch.allclose(scale.double(), stds, rtol=0.1)


def test_pca_head_matches_the_norm_of_visual_embeddings(fresh_tiny_gap):
    model, processor = fresh_tiny_gap
    images = [solid_image(tuple((37 * i + 60 * j) % 256 for j in range(3)), size=56 + 28 * (i % 3)) for i in range(24)]
    stats = fit_latent_head_pca(model, images, image_processor=processor.image_processor, batch_size=5)
    assert stats["count"] > 24 and math.isfinite(stats["mean_norm"])
    assert torch.isclose(model.latent_head.ema_norm, torch.tensor(stats["mean_norm"]), rtol=1e-5)

    processor.tokenizer.padding_side = "left"
    from testing_utils import chat

    batch = processor(
        images=[solid_image(c) for c in COLORS], text=[chat(processor, f"Question {i}?") for i in range(6)],
        padding=True, return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**batch)
        visual = torch.cat(out.image_outputs.pooler_output)
        hidden = model.model(**batch).last_hidden_state[batch["attention_mask"].bool()]
        pca_out = model.latent_head(hidden, feedback="pca")
        raw_out = model.latent_head(hidden, feedback="raw")
        ema_out = model.latent_head(hidden, feedback="ema_norm")
    visual_norm = visual.norm(dim=-1).mean()
    pca_ratio = (pca_out.norm(dim=-1).mean() / visual_norm).item()
    raw_ratio = (raw_out.norm(dim=-1).mean() / visual_norm).item()
    ema_ratio = (ema_out.norm(dim=-1).mean() / visual_norm).item()
    print(f"latent-norm / visual-embedding-norm: pca {pca_ratio:.3f}, raw {raw_ratio:.3f}, ema_norm {ema_ratio:.3f}")
    assert 0.8 <= pca_ratio <= 1.25
    # Outputs live in the fitted affine subspace.
    head = model.latent_head
    assert torch.allclose(head.project(pca_out), pca_out, atol=1e-4)
