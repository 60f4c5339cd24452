"""The teacher-forced losses train the model: both fall, gradients reach the head and the LM."""

import torch

from testing_utils import COLORS, chat, solid_image
from modeling_gap import fit_latent_head_pca


def _fixed_batch(processor):
    processor.tokenizer.padding_side = "right"
    answers = ["Look <|latent|> red.", "Zoom <|latent|> green.", "See <|latent|> blue.", "Crop <|latent|> yellow."]
    texts = [chat(processor, "Colour?", a) for a in answers]
    batch = processor(
        images=[solid_image(c) for c in COLORS[:4]], text=texts,
        aux_images=[[solid_image(c, size=84)] for c in COLORS[2:6]], padding=True, return_tensors="pt",
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch), labels


def test_two_hundred_steps_cut_both_losses(fresh_tiny_gap):
    model, processor = fresh_tiny_gap
    # As in the recipes: fit the PCA head on calibration images first (here the question and aux images).
    calibration = [solid_image(c, size=s) for c in COLORS for s in (56, 84)]
    fit_latent_head_pca(model, calibration, image_processor=processor.image_processor)
    batch, labels = _fixed_batch(processor)
    model.train()
    # Targets come from the model's own vision tower: frozen, as in GAP fine-tuning, so they stay put.
    model.model.visual.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    history = []
    for step in range(200):
        out = model(**batch, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            head_grads = [p.grad for p in model.latent_head.parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
            assert model.lm_head.weight.grad.abs().sum() > 0
            assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        optimizer.step()
        history.append((out.ce_loss.item(), out.latent_loss.item()))
    (ce0, lat0), (ce1, lat1) = history[0], history[-1]
    print(f"ce {ce0:.3f} -> {ce1:.3f}; latent {lat0:.3f} -> {lat1:.3f}")
    assert lat1 <= 0.1 * lat0
    assert ce1 <= 0.5 * ce0
    assert torch.allclose(out.loss, out.ce_loss + model.config.latent_loss_weight * out.latent_loss)


def test_zero_latent_weight_leaves_head_without_gradient(fresh_tiny_gap):
    model, processor = fresh_tiny_gap
    model.config.latent_loss_weight = 0.0
    batch, labels = _fixed_batch(processor)
    model.train()
    out = model(**batch, labels=labels)
    out.loss.backward()
    assert out.latent_loss is not None and not out.latent_loss.requires_grad
    assert torch.equal(out.loss, out.ce_loss)
    assert all(p.grad is None for p in model.latent_head.parameters())
    assert model.lm_head.weight.grad is not None
