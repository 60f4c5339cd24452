"""Configuration of `GapSFTTrainer`: TRL's `SFTConfig` plus GAP's alignment-loss and capacity fields."""

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from modeling_gap.configuration_gap import LATENT_LOSSES

LATENT_FEEDBACK_TRAINING = ("teacher", "self")

@dataclass
class GapSFTConfig(SFTConfig):
    r"""
    Configuration class for [`GapSFTTrainer`]: every field of TRL's [`~trl.SFTConfig`] (and of
    [`~transformers.TrainingArguments`]), plus the fields below. Defaults that differ from `SFTConfig`:
    `remove_unused_columns=False` (the collator needs `aux_images`, `use_latent`, `base_pass_rate`) and
    `assistant_only_loss=None` (GAP's labels: the assistant turns of `messages` rows, the completion of
    prompt-completion rows, all of a text row; `True` / `False` as in TRL).

    TRL's fields that GAP cannot honour are refused here, in one line: `packing_strategy` other than `"bfd"` (GAP
    packs whole rows), packing without `max_length`, `truncation_mode="keep_end"`, `dataset_num_proc` (no dataset
    pass to parallelise), and `pad_to_multiple_of` with `padding_free` or packing. The README's "Fine-tune" section
    lists what GAP does with each field.

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
        escape_special_tokens (`bool`, *optional*, defaults to `False`):
            A special-token string of the tokenizer typed in a row's text (`<|im_end|>`, `<|vision_start|>`,
            `<|latent_end|>`, ...) refuses the row, naming it; `True` trains such strings as plain text instead.
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
    escape_special_tokens: bool = field(
        default=False,
        metadata={"help": "Train special-token strings typed in a row's text (<|im_end|>, ...) as plain text instead "
                          "of refusing the row."},
    )
    validate_dataset: bool = field(
        default=True,
        metadata={"help": "Check every row of the datasets before training (errors name the row)."},
    )
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Labels of conversational rows: None (GAP's default) the assistant turns of `messages` rows "
                          "and the completion of prompt-completion rows; True the assistant turns only; False the "
                          "whole conversation (TRL's default)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Drop dataset columns the model does not take (keep False: the collator needs them)."},
    )
    # TRL turns gradient checkpointing on by default under its old name, which transformers 5 warns about on every
    # run; the same default here under the new name (`activation_checkpointing`), the old one left for users.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."}
    )
    if "activation_checkpointing" not in TrainingArguments.__dataclass_fields__:
        # transformers < 5.23 knows only `gradient_checkpointing`: the new name is taken here and passed on to it, so
        # that the recipes (which use the new name) run on every supported transformers.
        activation_checkpointing: bool | None = field(
            default=None, metadata={"help": "Gradient checkpointing (`gradient_checkpointing` before transformers 5.23)."}
        )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default
        if "activation_checkpointing" not in TrainingArguments.__dataclass_fields__ and self.gradient_checkpointing is None:
            self.gradient_checkpointing = bool(self.activation_checkpointing)
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
        self._refuse_unsupported_trl_fields()

    def _refuse_unsupported_trl_fields(self):
        """One line per `SFTConfig` field GAP cannot honour (never accepted and ignored)."""
        if (self.packing or self.eval_packing) and self.packing_strategy != "bfd":
            raise ValueError(
                f"packing_strategy={self.packing_strategy!r} cuts rows, which would cut images and latent spans: GAP "
                "packs whole rows, packing_strategy='bfd'."
            )
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise ValueError("packing needs max_length (the tokens of one pack), as in TRL.")
        if self.truncation_mode != "keep_start":
            raise ValueError(
                f"truncation_mode={self.truncation_mode!r} is not supported: cutting the start drops image tokens; "
                "GAP cuts rows at the end, in text only (truncation_mode='keep_start')."
            )
        if self.dataset_num_proc is not None:
            raise ValueError(
                "dataset_num_proc is not supported: GAP prepares no dataset (each row is encoded by the collator "
                "when batched). Use dataloader_num_workers to encode rows in parallel."
            )
        if (self.padding_free or self.packing or self.eval_packing) and self.pad_to_multiple_of:
            raise ValueError(
                "padding_free / packing concatenate rows: pad_to_multiple_of has nothing to pad; unset it."
            )


__all__ = [
    "GapSFTConfig",
    "LATENT_FEEDBACK_TRAINING",
]
