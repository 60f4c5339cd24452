"""The memory a fine-tune needs per GPU, before renting GPUs (`gap memory-plan`).

The GAP model is built on the meta device from the model's config (Qwen2.5-VL-7B-Instruct's is included, so nothing
is downloaded; `--model_name_or_path` reads another config), so the parameter counts are exact. For each recipe the
trainable parameters follow what `gap sft` trains: everything but the frozen vision tower (full fine-tune), or the
LoRA adapters of `gap_lora_config` plus the latent head (LoRA, QLoRA). Bytes per GPU:

- full fine-tune, DeepSpeed ZeRO-3 over N GPUs, bf16 (the ZeRO paper's accounting): weights 2 P / N, gradients
  2 T / N, optimizer states 12 T / N (fp32 master weights, Adam's two moments); plus the largest module's weights
  gathered whole while it runs (the LM head, also gathered for the fused loss), twice (prefetch);
- LoRA on one GPU: weights 2 P (bf16) + 4 T (the adapters and the trained head copy in fp32, as PEFT casts them),
  gradients 4 T, optimizer 8 T;
- QLoRA: as LoRA, the language model's linear weights in 4-bit NF4 (0.5 byte, plus the quantization constants: 4
  bytes per 64 weights, or about 0.127 bits with nested quantization) and the rest in bf16;
- activations at the recipe's `per_device_train_batch_size` x `max_length` (the longest row it admits), bf16: with
  activation checkpointing, one saved hidden state per decoder layer plus one layer recomputed in the backward pass
  (norms, q/k/v, attention output, residuals and the MLP's four intermediate tensors); without it, every layer's;
  plus TRL's fused log-probability kernel (one bf16 logits tile, the fp32 gradient of the final states and, for a full
  fine-tune, the fp32 gradient of the whole LM head weight, accumulated in its backward). The vision tower is
  frozen and runs without gradient; its transient activations are left out, as are the CUDA context and allocator
  fragmentation (count 1-3 GiB more).
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import yaml

GIB = 1024**3

# config.json of Qwen/Qwen2.5-VL-7B-Instruct (the fields that shape the weights).
QWEN2_5_VL_7B_CONFIG = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        in_chans=3, hidden_act="silu",
    ),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)
# GAP's three latent tokens take three of the vocabulary's spare rows (152064 > the tokenizer's 151665).
LATENT_TOKEN_IDS = dict(latent_pad_token_id=151665, latent_start_token_id=151666, latent_end_token_id=151667)
SEVEN_B_RECIPES = (
    ("recipes/qwen2_5_vl_7b/sft/config_pca.yaml", 8),
    ("recipes/qwen2_5_vl_7b/sft/config_pca_lora.yaml", 1),
    ("recipes/qwen2_5_vl_7b/sft/config_pca_qlora.yaml", 1),
)


@dataclass
class MemoryPlanArguments:
    """`gap memory-plan`: parameters and memory per GPU of each recipe (`trainers.memory_plan`)."""

    recipes: list[str] = field(
        default_factory=lambda: [path for path, _ in SEVEN_B_RECIPES],
        metadata={"help": "`gap sft` recipe files (YAML); default: the 7B full (ZeRO-3), LoRA and QLoRA recipes."})
    num_gpus: int = field(default=8, metadata={"help": "GPUs that a full fine-tune shards over (ZeRO-3)."})
    model_config: str | None = field(
        default=None, metadata={"help": "A model's config.json (or directory) instead of Qwen2.5-VL-7B's."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the plan as JSON here."})


def meta_gap_model(config_dict: dict | None = None, num_latent_tokens: int = 8, latent_pca_rank: int = 256):
    """The GAP model of a Qwen2.5-VL config (default: 7B), on the meta device: every shape, no memory."""
    from modeling_gap import GapQwen2_5VLConfig, GapQwen2_5VLForConditionalGeneration

    config_dict = {k: v for k, v in (config_dict or QWEN2_5_VL_7B_CONFIG).items()
                   if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    ids = LATENT_TOKEN_IDS if config_dict is QWEN2_5_VL_7B_CONFIG or "latent_pad_token_id" not in config_dict else {}
    config = GapQwen2_5VLConfig(**config_dict, **ids, num_latent_tokens=num_latent_tokens,
                                latent_pca_rank=latent_pca_rank)
    with torch.device("meta"):
        return GapQwen2_5VLForConditionalGeneration(config)


def lora_parameters(model, r: int, target_modules: str, dora: bool = False) -> int:
    """Parameters of the LoRA adapters `gap_lora_config` puts on `model` (r (in + out) per targeted Linear)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(target_modules, name):
            total += r * (module.in_features + module.out_features) + (module.out_features if dora else 0)
    return total


def _count(params) -> int:
    return sum(p.numel() for p in params)


def plan_recipe(model, recipe: dict, num_gpus: int, name: str = "") -> dict:
    """One row of the plan for a parsed recipe (a dict of `gap sft` options) on `model` (meta or real)."""
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from .model_loader import GAP_LORA_TARGET_MODULES

    text = model.config.text_config
    total = _count(model.parameters())
    vision = _count(model.model.visual.parameters())
    head = _count(model.latent_head.parameters())
    peft = bool(recipe.get("use_peft"))
    four_bit = bool(recipe.get("load_in_4bit"))
    gpus = 1 if peft else num_gpus
    if peft:
        adapters = lora_parameters(model, int(recipe.get("lora_r", 16)), GAP_LORA_TARGET_MODULES,
                                   bool(recipe.get("use_dora")))
        trainable = adapters + head
        if four_bit:
            quantized = sum(
                m.weight.numel() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "language_model" in n)
            constants = 0.127 / 8 if recipe.get("use_bnb_nested_quant") else 4 / 64
            weights = quantized * (0.5 + constants) + (total - quantized) * 2 + trainable * 4
            strategy = "QLoRA (4-bit NF4), 1 GPU"
        else:
            weights = total * 2 + trainable * 4
            strategy = "LoRA, 1 GPU"
        gradients, optimizer = trainable * 4, trainable * 8
    else:
        trainable = total - (vision if recipe.get("freeze_vision_tower", True) else 0)
        largest = max(model.get_output_embeddings().weight.numel(), model.get_input_embeddings().weight.numel())
        weights = total * 2 / gpus + 2 * largest * 2
        gradients, optimizer = trainable * 2 / gpus, trainable * 12 / gpus
        strategy = f"full, DeepSpeed ZeRO-3 over {gpus} GPUs"

    batch = int(recipe.get("per_device_train_batch_size", 1))
    length = int(recipe.get("max_length", 1024))
    tokens = batch * length
    d, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    kv = text.num_key_value_heads * (d // text.num_attention_heads)
    per_layer = tokens * (9 * d + 2 * kv + 4 * inter) * 2
    checkpointing = recipe.get("activation_checkpointing", recipe.get("gradient_checkpointing", True))
    activations = (layers * tokens * d * 2 + per_layer) if checkpointing else layers * per_layer
    # TRL's fused log-probability kernel: one (token chunk x vocabulary chunk) logits tile, the fp32 gradient of the
    # final states, and, when the LM head trains, the fp32 gradient of its whole weight (accumulated in the backward).
    lm_head_trains = not peft
    activations += min(tokens, TOKEN_CHUNK_SIZE) * min(text.vocab_size, _CHUNKED_LOGPROB_CHUNK_SIZE) * 2
    activations += tokens * d * 4 + (text.vocab_size * d * 4 if lm_head_trains else 0)
    row = dict(
        recipe=name, strategy=strategy, gpus=gpus, batch=batch, max_length=length,
        activation_checkpointing=bool(checkpointing), parameters=total, trainable_parameters=trainable,
        weights_gib=weights / GIB, gradients_gib=gradients / GIB, optimizer_gib=optimizer / GIB,
        activations_gib=activations / GIB,
    )
    row["total_gib"] = sum(row[k] for k in ("weights_gib", "gradients_gib", "optimizer_gib", "activations_gib"))
    return row


def read_recipe(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def format_plan(rows: list[dict]) -> str:
    header = ("| recipe | strategy | params | trainable | batch x length | weights | gradients | optimizer | "
              "activations | total per GPU |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['strategy']} | {r['parameters'] / 1e9:.2f} B | {_human(r['trainable_parameters'])} "
            f"| {r['batch']} x {r['max_length']} | {r['weights_gib']:.1f} GiB | {r['gradients_gib']:.1f} GiB | "
            f"{r['optimizer_gib']:.1f} GiB | {r['activations_gib']:.1f} GiB | **{r['total_gib']:.1f} GiB** |"
        )
    return "\n".join(lines)


def _human(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.1f} M"


def memory_plan(args: MemoryPlanArguments) -> list[dict]:
    """`gap memory-plan`: print the table (Markdown) and return its rows."""
    config_dict = None
    if args.model_config:
        path = args.model_config
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(path) as f:
            config_dict = json.load(f)
    rows = []
    for recipe_path in args.recipes:
        recipe = read_recipe(recipe_path)
        model = meta_gap_model(config_dict, num_latent_tokens=int(recipe.get("num_latent_tokens") or 8))
        name = os.path.splitext(os.path.basename(recipe_path))[0].removeprefix("config_")
        rows.append(plan_recipe(model, recipe, args.num_gpus, name=name))
    print(format_plan(rows))
    print("Estimates (see `trainers/memory_plan.py`); add 1-3 GiB per GPU for the CUDA context and fragmentation.")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


__all__ = ["MemoryPlanArguments", "QWEN2_5_VL_7B_CONFIG", "lora_parameters", "memory_plan", "meta_gap_model",
           "plan_recipe"]
