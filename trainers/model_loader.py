"""Loading a model for any stage: the tiny random model, a stock Qwen2.5-VL (converted to GAP, or kept as the
baseline), or a GAP checkpoint; dtype, 4/8-bit quantization, device map, the processor (with its no-torchvision
fallback), and the LoRA / quantization configs GAP trains with.

Safetensors only: a checkpoint whose weights are pickles (`pytorch_model.bin`) is refused unless
`allow_pickle_weights=True` (a pickle runs code when it is loaded). `trust_remote_code` is off by default: with this
package imported, GAP checkpoints load with its own classes, and a checkpoint's code runs only when asked for.
"""

import os

import torch

TINY_MODEL = "tiny"
STOCK_MODEL_TYPE = "qwen2_5_vl"

# LoRA on the language model only: the vision tower also has gate/up/down projections, which a plain list would hit.
GAP_LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The latent head is new: it trains in full (and is saved whole with the adapter).
GAP_LORA_MODULES_TO_SAVE = ["latent_head"]
# Modules kept in full precision when the base is quantized (QLoRA): the vision tower (which makes the latent
# targets), the latent head and the LM head. transformers matches these from the start of a module's full name
# ("model.visual.blocks.0...") or as its suffix.
GAP_QUANTIZATION_SKIP_MODULES = ["model.visual", "visual", "latent_head", "lm_head"]




def resolve_dtype(dtype):
    """`"auto"`, None, a `torch.dtype` or its name ("bfloat16") -> what `from_pretrained` takes."""
    if dtype in (None, "auto") or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype name (float32, bfloat16, ...); got {dtype!r}.")
    return value


def load_processor(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's processor; `GapQwen2_5VLProcessor.from_stock_pretrained` where `AutoProcessor` cannot build
    the stock one (its video processor needs torchvision)."""
    from transformers import AutoProcessor

    from modeling_gap import GapQwen2_5VLProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, TypeError):
        return GapQwen2_5VLProcessor.from_stock_pretrained(name_or_path, revision=revision)


def load_model(
    name_or_path: str,
    *,
    stock: str = "convert",
    dtype="auto",
    revision: str | None = None,
    attn_implementation: str | None = None,
    quantization=None,
    device_map=None,
    gap_options: dict | None = None,
    tiny_options: dict | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
):
    """`(model, processor)` from `name_or_path`:

    - `"tiny"`: the tiny random GAP model (`trainers.tiny.build_tiny_gap`, `tiny_options` and `gap_options`, seeded);
    - a stock Qwen2.5-VL checkpoint: converted with `from_qwen2_5_vl(**gap_options)` when `stock="convert"`, loaded
      as it is (a baseline) when `stock="keep"`;
    - a GAP checkpoint: loaded as it is (its own K and feedback; `gap_options` must not ask for others).

    `quantization` (a `BitsAndBytesConfig`, see `gap_quantization_config`) needs a GAP checkpoint; on GPUs each
    process then gets its own device (`device_map={"": local rank}`).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from modeling_gap import from_qwen2_5_vl

    if stock not in ("convert", "keep"):
        raise ValueError(f"stock must be 'convert' or 'keep'; got {stock!r}.")
    if not name_or_path:
        raise ValueError("a model is required: 'tiny', a GAP checkpoint or a stock Qwen2.5-VL (directory or Hub id).")
    gap_options = {k: v for k, v in (gap_options or {}).items() if v is not None}
    dtype = resolve_dtype(dtype)

    if name_or_path == TINY_MODEL:
        from .tiny import build_tiny_gap

        if quantization is not None:
            raise ValueError("Quantization needs a checkpoint: write the tiny model first (`gap make-tiny`).")
        model, processor = build_tiny_gap(seed=seed, **(tiny_options or {}), **gap_options)
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        # Qwen2.5-VL-Instruct ends a turn with <|im_end|>: make it the tokenizer's eos, as the model's config has it
        # (the Trainer otherwise aligns the model's eos on the tokenizer's <|endoftext|>).
        processor.tokenizer.eos_token = "<|im_end|>"
        return model, processor

    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(name_or_path):
        raise ValueError(f"model {name_or_path!r}: no such directory (give a checkpoint directory, a Hub id or 'tiny').")
    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    loading = dict(revision=revision, dtype=dtype, attn_implementation=attn_implementation,
                   use_safetensors=None if allow_pickle_weights else True, trust_remote_code=trust_remote_code)
    if config.model_type == STOCK_MODEL_TYPE and stock == "convert":
        if quantization is not None:
            raise ValueError("Convert the stock checkpoint first (`gap fit-pca`), then quantize the GAP checkpoint.")
        processor = load_processor(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        # Converted from the path: the stock weights load straight into the GAP class (partitioned under ZeRO-3);
        # the fresh latent head is drawn from `seed`.
        torch.manual_seed(seed)
        load_options = {k: v for k, v in loading.items() if k not in ("dtype", "trust_remote_code")}
        return _from_pretrained(
            lambda path, **kwargs: from_qwen2_5_vl(path, processor, **kwargs), name_or_path, allow_pickle_weights,
            dtype=dtype, load_options=load_options, **gap_options,
        )
    if config.model_type != STOCK_MODEL_TYPE and gap_options:
        for name, value in gap_options.items():
            if getattr(config, name, value) != value:
                raise ValueError(
                    f"{name_or_path} is a GAP checkpoint with {name}={getattr(config, name)!r}, not {value!r}: drop the "
                    f"option to use the checkpoint's own, or re-configure it with `from_qwen2_5_vl({name_or_path!r}, "
                    f"{name}={value!r})` and save it."
                )
    if quantization is not None and device_map is None and torch.cuda.is_available():
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}
    model = _from_pretrained(AutoModelForImageTextToText, name_or_path, allow_pickle_weights,
                             quantization_config=quantization, device_map=device_map, **loading)
    processor = load_processor(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    return model, processor


def _from_pretrained(load, name_or_path, allow_pickle_weights: bool, **kwargs):
    """`load.from_pretrained(name_or_path, **kwargs)` (an auto class) or `load(name_or_path, **kwargs)`, with the
    missing-safetensors error explained."""
    try:
        return getattr(load, "from_pretrained", load)(name_or_path, **kwargs)
    except OSError as error:
        if not allow_pickle_weights and "safetensors" in str(error).lower():
            raise OSError(
                f"{name_or_path} has no safetensors weights. Pickled weights (pytorch_model.bin) can run code when "
                "loaded: convert them to safetensors, or pass allow_pickle_weights=True (`--allow_pickle_weights`) "
                "if you trust the file."
            ) from error
        raise


def gap_lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules=None,
    modules_to_save=None,
    **kwargs,
):
    """A `peft.LoraConfig` for GAP: LoRA on the language model's projections (`GAP_LORA_TARGET_MODULES`), the latent
    head trained in full and saved with the adapter (`modules_to_save` always includes `"latent_head"`)."""
    from peft import LoraConfig

    save = list(GAP_LORA_MODULES_TO_SAVE)
    for name in modules_to_save or []:
        if name not in save:
            save.append(name)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules or GAP_LORA_TARGET_MODULES,
        modules_to_save=save,
        **kwargs,
    )


def gap_quantization_config(load_in_4bit: bool = True, load_in_8bit: bool = False, quant_type: str = "nf4",
                            compute_dtype=None, double_quant: bool = False):
    """A `BitsAndBytesConfig` that quantizes the language model only: the vision tower, the latent head and the LM
    head stay in full precision (`GAP_QUANTIZATION_SKIP_MODULES`)."""
    from transformers import BitsAndBytesConfig

    if load_in_4bit == load_in_8bit:
        raise ValueError("Choose exactly one of load_in_4bit and load_in_8bit.")
    return BitsAndBytesConfig(
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_skip_modules=list(GAP_QUANTIZATION_SKIP_MODULES),
    )


__all__ = [
    "GAP_LORA_MODULES_TO_SAVE",
    "GAP_LORA_TARGET_MODULES",
    "GAP_QUANTIZATION_SKIP_MODULES",
    "TINY_MODEL",
    "gap_lora_config",
    "gap_quantization_config",
    "load_model",
    "load_processor",
    "resolve_dtype",
]
