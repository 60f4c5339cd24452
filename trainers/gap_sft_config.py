"""Configuration of `GapSFTTrainer`: TRL's `SFTConfig` plus GAP's alignment-loss and capacity fields."""

from dataclasses import dataclass, field

from trl import SFTConfig

from modeling_gap.configuration_gap import LATENT_LOSSES

LATENT_FEEDBACK_TRAINING = ("teacher", "self")

# LoRA on the language model only: the vision tower also has gate/up/down projections, which a plain list would hit.
GAP_LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The latent head is new: it trains in full (and is saved whole with the adapter).
GAP_LORA_MODULES_TO_SAVE = ["latent_head"]
# Modules kept in full precision when the base is quantized (QLoRA): the vision tower (which makes the latent
# targets), the latent head and the LM head. transformers matches these from the start of a module's full name
# ("model.visual.blocks.0...") or as its suffix.
GAP_QUANTIZATION_SKIP_MODULES = ["model.visual", "visual", "latent_head", "lm_head"]


@dataclass
class GapSFTConfig(SFTConfig):
    r"""
    Configuration class for [`GapSFTTrainer`]: every field of TRL's [`~trl.SFTConfig`] (and of
    [`~transformers.TrainingArguments`]), plus the fields below. Defaults that differ from `SFTConfig`:
    `remove_unused_columns=False` (the collator needs `aux_images`, `use_latent`, `base_pass_rate`).

    Parameters:
        > GAP losses

        latent_loss_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the latent loss: `loss = ce_loss + latent_loss_weight * latent_loss`. Written into the model's
            config (`latent_loss_weight`) when training starts. `0` trains the text only (the latent loss is still
            logged).
        latent_loss (`str`, *optional*, defaults to `"mse_whitened+cos"`):
            Kind of latent loss: `"mse_whitened+cos"` (MSE in whitened PCA coordinates plus 1 - cosine), `"mse"`
            (MSE in embedding space) or `"cos"` (1 - cosine). Overrides the model config's `latent_loss`.
        latent_feedback_training (`str`, *optional*, defaults to `"teacher"`):
            What the latent slots receive during training: `"teacher"` (the targets, projected onto the PCA subspace
            in `pca` mode: one teacher-forced pass) or `"self"` (closed loop: the head's own predictions, computed
            without gradient by K extra passes, then one pass with gradient; slower, for ablation).

        > Capacity

        capacity_guided (`bool`, *optional*, defaults to `True`):
            Honour the per-row `use_latent` column (or `base_pass_rate` when `use_latent` is absent): rows marked
            easy lose their latent spans and aux images and train as plain text. `False` keeps every span
            (ablation of the capacity level).
        capacity_threshold (`float`, *optional*, defaults to `0.5`):
            For rows with `base_pass_rate` but no `use_latent`: the span is kept when `base_pass_rate <=
            capacity_threshold`.

        > Model and data

        freeze_vision_tower (`bool`, *optional*, defaults to `True`):
            Freeze the vision tower (`model.model.visual`). The latent targets are the model's own visual input
            embeddings of the aux images: a trainable tower makes them drift (and can make them explode).
        validate_dataset (`bool`, *optional*, defaults to `True`):
            Check every row of the train and eval datasets with `validate_gap_dataset` before training (each
            malformed row is reported by index). Costs one processor pass per row.
    """

    latent_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the latent loss: loss = ce_loss + latent_loss_weight * latent_loss."},
    )
    latent_loss: str = field(
        default="mse_whitened+cos",
        metadata={"help": "Latent loss kind.", "choices": list(LATENT_LOSSES)},
    )
    latent_feedback_training: str = field(
        default="teacher",
        metadata={
            "help": "What the latent slots receive in training: 'teacher' (targets) or 'self' (the head's own "
            "closed-loop predictions; slower).",
            "choices": list(LATENT_FEEDBACK_TRAINING),
        },
    )
    capacity_guided: bool = field(
        default=True,
        metadata={"help": "Honour use_latent / base_pass_rate per row (easy rows train as plain text)."},
    )
    capacity_threshold: float = field(
        default=0.5,
        metadata={"help": "Rows with only base_pass_rate keep their span when base_pass_rate <= this."},
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={"help": "Freeze the vision tower (it produces the latent targets)."},
    )
    validate_dataset: bool = field(
        default=True,
        metadata={"help": "Check every row of the datasets before training (errors name the row)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Drop dataset columns the model does not take (keep False: the collator needs them)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.latent_loss_weight, (int, float)) and self.latent_loss_weight >= 0):
            raise ValueError(f"latent_loss_weight must be a number >= 0; got {self.latent_loss_weight!r}.")
        if self.latent_loss not in LATENT_LOSSES:
            raise ValueError(f"latent_loss must be one of {LATENT_LOSSES}; got {self.latent_loss!r}.")
        if self.latent_feedback_training not in LATENT_FEEDBACK_TRAINING:
            raise ValueError(
                f"latent_feedback_training must be one of {LATENT_FEEDBACK_TRAINING}; got "
                f"{self.latent_feedback_training!r}."
            )
        if not 0 <= self.capacity_threshold <= 1:
            raise ValueError(f"capacity_threshold must be in [0, 1]; got {self.capacity_threshold!r}.")
        if self.capacity_guided and self.ddp_find_unused_parameters is None:
            # A batch of rows trained as plain text leaves the latent head without gradient; DDP must allow that.
            self.ddp_find_unused_parameters = True
        if self.packing or self.padding_free:
            raise ValueError("GapSFTTrainer supports neither packing nor padding-free batches (images, latent spans).")


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
    "GapSFTConfig",
    "LATENT_FEEDBACK_TRAINING",
    "gap_lora_config",
    "gap_quantization_config",
]
