"""A tiny, random, fully offline Qwen2.5-VL and its GAP conversion: for tests, the demo and benchmarks.

The tokenizer is byte-level (256 symbols, no merges: lossless on any text) plus Qwen's special tokens and the
Qwen2.5-VL chat template; the vision tower is two blocks wide 32. Nothing is downloaded. `gap make-tiny` writes
either as a checkpoint: the offline stand-in for `Qwen/Qwen2.5-VL-7B-Instruct` (`--stock`) or for a GAP checkpoint.
"""

import contextlib

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)

from modeling_gap import GapQwen2_5VLProcessor, from_qwen2_5_vl

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# The Qwen2.5-VL chat template, with `{% generation %}` around assistant turns so that TRL can mask the prompt.
CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for item in content %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ render(message['content']) }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ render(message['content']) }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's reversible map of the 256 bytes to printable unicode symbols, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(printable, codes))
    return [chr(table[b]) for b in range(256)]


def tiny_tokenizer() -> Qwen2Tokenizer:
    """Byte-level Qwen2 tokenizer: ids 0-255 are bytes, then Qwen's special tokens; the chat template is set."""
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.eos_token = "<|im_end|>"  # as Qwen2.5-VL-Instruct's tokenizer: turns end generation
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_image_processor(max_side: int = 112) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL PIL image processor (no torchvision) for images between 56x56 and `max_side` squared."""
    return Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": max_side * max_side})


def tiny_qwen2_5_vl_config(tokenizer=None, hidden_size: int = 64, num_layers: int = 2, **text_overrides) -> Qwen2_5_VLConfig:
    """A stock Qwen2.5-VL config of the given text width (heads of 16 dims, M-RoPE sections summing to 8)."""
    tokenizer = tokenizer or tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads = max(hidden_size // 16, 1)
    text = dict(
        vocab_size=(len(tokenizer) + 64 + 63) // 64 * 64,  # spare rows, as Qwen's 152064 leaves room for added tokens
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    text.update(text_overrides)
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1], patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=hidden_size, in_chans=3,
        hidden_act="silu",
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


@contextlib.contextmanager
def whole_weights():
    """Build modules with whole weights even when DeepSpeed ZeRO-3 is configured (transformers would otherwise
    construct them partitioned under `zero.Init`, and initialise them in another order): a tiny model is built as in
    one process, the same weights for the same seed, and DeepSpeed partitions it when its engine starts."""
    from transformers.integrations import deepspeed

    saved = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = saved


def build_tiny_qwen2_5_vl(seed: int = 0, **config_options):
    """(stock `Qwen2_5_VLForConditionalGeneration`, tokenizer, image processor), random weights, fp32, eval mode."""
    tokenizer = tiny_tokenizer()
    config = tiny_qwen2_5_vl_config(tokenizer, **config_options)
    torch.manual_seed(seed)
    with whole_weights():
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model, tokenizer, tiny_image_processor()


def save_tiny_qwen2_5_vl(output_dir: str, seed: int = 0, **config_options) -> str:
    """Write a stock tiny Qwen2.5-VL checkpoint (weights, tokenizer, image processor) as from the Hub."""
    model, tokenizer, image_processor = build_tiny_qwen2_5_vl(seed, **config_options)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    return output_dir


def build_tiny_gap(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, **gap_options):
    """(`GapQwen2_5VLForConditionalGeneration`, `GapQwen2_5VLProcessor`): the tiny stock model converted by
    `from_qwen2_5_vl`; `gap_options` are GAP config fields (default K=4, PCA rank 16)."""
    gap_options.setdefault("num_latent_tokens", 4)
    gap_options.setdefault("latent_pca_rank", 16)
    model, tokenizer, image_processor = build_tiny_qwen2_5_vl(seed, hidden_size=hidden_size, num_layers=num_layers)
    processor = GapQwen2_5VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed + 1)
    with whole_weights():
        return from_qwen2_5_vl(model, processor, **gap_options)


def make_tiny(args) -> str:
    """`gap make-tiny`: write the tiny GAP checkpoint (or, with `args.stock`, the stock tiny Qwen2.5-VL) to
    `args.output_dir` (a `trainers.arguments.MakeTinyArguments`)."""
    if args.stock:
        save_tiny_qwen2_5_vl(args.output_dir, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers)
        print(f"wrote a tiny stock Qwen2.5-VL checkpoint to {args.output_dir}")
        return args.output_dir
    model, processor = build_tiny_gap(
        seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_latent_tokens=args.num_latent_tokens, latent_feedback=args.latent_feedback,
    )
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"wrote a tiny GAP checkpoint ({args.latent_feedback} feedback, K={args.num_latent_tokens}) to "
          f"{args.output_dir}")
    return args.output_dir


__all__ = [
    "CHAT_TEMPLATE",
    "build_tiny_gap",
    "build_tiny_qwen2_5_vl",
    "make_tiny",
    "save_tiny_qwen2_5_vl",
    "tiny_image_processor",
    "tiny_qwen2_5_vl_config",
    "tiny_tokenizer",
]
