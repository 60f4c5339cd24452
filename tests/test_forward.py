"""The teacher-forced forward equals a step-by-step KV-cached loop that feeds the same latent vectors."""

import torch
from transformers import DynamicCache

from testing_utils import COLORS, chat, solid_image


def test_teacher_forced_forward_matches_cached_loop(tiny_gap):
    model, processor = tiny_gap
    processor.tokenizer.padding_side = "left"
    texts = [
        chat(processor, "Where is it?", "First <|latent|> then <|latent|> so: top left."),
        chat(processor, "Colour, please, of the large square?", "Zoom <|latent|> red."),
        chat(processor, "Hi", "No latent needed here, plain text."),
    ]
    batch = processor(
        images=[solid_image(c) for c in COLORS[:3]], text=texts,
        aux_images=[[solid_image(COLORS[3]), solid_image(COLORS[4])], [solid_image(COLORS[5])], []],
        padding=True, return_tensors="pt",
    )
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is exercised
    with torch.no_grad():
        full = model(**batch)
    assert full.latent_targets.shape == (3, model.config.num_latent_tokens, model.config.text_config.hidden_size)

    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    positions, _ = model.model.get_rope_index(
        input_ids, batch["mm_token_type_ids"], batch["image_grid_thw"], attention_mask=mask
    )
    slots = model.latent_slot_mask(input_ids)
    fed = model.latent_head.teacher_inputs(full.latent_targets, model.config.latent_feedback).reshape(-1, model.config.text_config.hidden_size)
    embeds = model.get_input_embeddings()(input_ids).masked_scatter(slots[..., None], fed)

    # Prefill everything before the first latent slot in any row (it holds all images).
    prefix = int(slots.float().argmax(-1)[slots.any(-1)].min())
    assert prefix > int((input_ids == model.config.image_token_id).nonzero()[:, 1].max())
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(
            input_ids=input_ids[:, :prefix], attention_mask=mask[:, :prefix], position_ids=positions[:, :, :prefix],
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"][:, :prefix], cache=cache, use_cache=True,
        )
        step_logits = [out.logits]
        for t in range(prefix, input_ids.shape[1]):
            out = model(
                inputs_embeds=embeds[:, t : t + 1], attention_mask=mask[:, : t + 1],
                position_ids=positions[:, :, t : t + 1], cache=cache, use_cache=True,
            )
            step_logits.append(out.logits)
    stepwise = torch.cat(step_logits, dim=1)
    real = mask.bool()
    difference = (stepwise - full.logits).abs()[real].max().item()
    assert difference < 1e-4, difference
    # The latent slots really carry the targets: feeding plain pad embeddings instead changes the logits.
    with torch.no_grad():
        zeroed = model(**{k: v for k, v in batch.items() if not k.startswith("aux")},
                       latent_targets=torch.zeros_like(full.latent_targets))
    assert (zeroed.logits - full.logits).abs()[real].max() > 1e-3


def test_closed_loop_latents_equal_generation(tiny_gap):
    """`closed_loop_latent_inputs` feeds exactly what generate feeds (the self-feedback training path)."""
    from transformers import LogitsProcessorList

    from testing_utils import ForceTokenAtStep

    model, processor = tiny_gap
    processor.tokenizer.padding_side = "left"
    batch = processor(images=[solid_image(COLORS[0])], text=[chat(processor, "Where?")], return_tensors="pt")
    prompt = batch["input_ids"].shape[1]
    force = LogitsProcessorList([ForceTokenAtStep(model.config.latent_start_token_id, {0: 1}, prompt)])
    k = model.config.num_latent_tokens
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2 * k + 6, do_sample=False, return_latents=True,
                             logits_processor=force, sequence_bias={(model.config.latent_start_token_id,): 4.0})
    latents = out.latents[0]
    assert latents.shape[0] >= 1
    spans = latents.shape[0]
    pad, start, end = model.config.latent_token_ids
    sequence = out.sequences[:, :]
    last_end = [i for i, t in enumerate(sequence[0].tolist()) if t == end][spans - 1]
    sequence = sequence[:, : last_end + 1]
    length = sequence.shape[1]
    inputs = dict(
        input_ids=sequence, attention_mask=torch.ones_like(sequence), pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros(1, length - prompt, dtype=torch.long)], 1),
        latent_targets=torch.zeros_like(latents),
    )
    closed = model.closed_loop_latent_inputs(**inputs)
    assert (closed - latents).abs().max() < 1e-4
