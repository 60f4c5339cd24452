"""`trainers.pca_fit` (`gap fit-pca`): a stock tiny checkpoint converted, its latent head fitted and saved."""

import json

import torch

from testing_utils import save_training_split
from trainers.arguments import FitPCAArguments
from trainers.pca_fit import fit_pca


def test_fit_pca_converts_fits_and_the_reloaded_model_uses_the_buffers(tmp_path):
    from transformers import AutoModelForImageTextToText

    from trainers.tiny import save_tiny_qwen2_5_vl

    stock = save_tiny_qwen2_5_vl(str(tmp_path / "stock"))
    split = save_training_split(tmp_path / "data")
    args = FitPCAArguments(model_name_or_path=stock, dataset_name=split, num_latent_tokens=4,
                           max_images=10, batch_size=4, output_dir=str(tmp_path / "gap"))
    summary = fit_pca(args)
    assert summary["vectors"] > 10 and summary["rank"] == 64  # rank 256 capped at the tiny hidden size
    assert json.load(open(tmp_path / "gap" / "pca_fit.json"))["vectors"] == summary["vectors"]

    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "gap"), trust_remote_code=True)
    head = model.latent_head
    assert head.pca_mean.abs().sum() > 0 and float(head.ema_norm) > 0
    assert not torch.equal(head.pca_components, torch.eye(64))  # fitted, not the initial basis
    assert torch.allclose(head.pca_components.T @ head.pca_components, torch.eye(64), atol=1e-4)
    # Its latents are the fitted subspace's: mean + U (s * coords).
    states = torch.randn(5, 64)
    latents = head(states, model.config.latent_feedback)
    expected = head.pca_mean + (head.proj(head.norm(states)) * head.pca_scale) @ head.pca_components.T
    assert torch.allclose(latents, expected, atol=1e-5)
