"""`from_qwen2_5_vl` turns a stock checkpoint into a GAP model without touching a stock weight."""

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from testing_utils import COLORS, chat, solid_image
from modeling_gap import GapQwen2_5VLForConditionalGeneration, GapQwen2_5VLProcessor, from_qwen2_5_vl
from trainers.tiny import save_tiny_qwen2_5_vl


def test_stock_checkpoint_converts_with_weights_untouched(tmp_path):
    path = save_tiny_qwen2_5_vl(str(tmp_path / "stock"), seed=3)
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    stock_state = {k: v.clone() for k, v in stock.state_dict().items()}

    model, processor = from_qwen2_5_vl(path, num_latent_tokens=6, latent_feedback="ema_norm")
    assert isinstance(model, GapQwen2_5VLForConditionalGeneration)
    assert isinstance(processor, GapQwen2_5VLProcessor)
    assert model.config.num_latent_tokens == processor.num_latent_tokens == 6
    assert model.config.latent_feedback == "ema_norm"
    pad, start, end = model.config.latent_token_ids
    assert (pad, start, end) == processor.latent_token_ids
    # Added in the order pad, start, end: consecutive ids right after the stock vocabulary.
    assert (start, end) == (pad + 1, pad + 2)
    assert end < model.config.text_config.vocab_size  # spare rows: no resize was needed

    gap_state = model.state_dict()
    for name, tensor in stock_state.items():
        assert torch.equal(gap_state[name], tensor), name
    assert set(gap_state) - set(stock_state) == {k for k in gap_state if k.startswith("latent_head.")}

    processor.tokenizer.padding_side = "left"
    batch = processor(
        images=[solid_image(COLORS[0]), solid_image(COLORS[3])],
        text=[chat(processor, "What is it?"), chat(processor, "A longer question about the image?")],
        padding=True, return_tensors="pt",
    )
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)


def test_full_vocabulary_is_resized_and_old_rows_kept():
    from trainers.tiny import build_tiny_qwen2_5_vl, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    stock, tokenizer, image_processor = build_tiny_qwen2_5_vl(seed=1, vocab_size=len(tokenizer))
    old_embed = stock.get_input_embeddings().weight.detach().clone()
    old_head = stock.lm_head.weight.detach().clone()
    processor = GapQwen2_5VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model, processor = from_qwen2_5_vl(stock, processor)
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == old_embed.shape[0] + 3
    assert torch.equal(model.get_input_embeddings().weight[: old_embed.shape[0]], old_embed)
    assert torch.equal(model.lm_head.weight[: old_head.shape[0]], old_head)
