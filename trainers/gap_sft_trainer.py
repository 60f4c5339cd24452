"""`GapSFTTrainer`: TRL's `SFTTrainer` with GAP's alignment losses (text CE + weighted latent loss).

TRL 1.16's `SFTTrainer.compute_loss` never calls the model's forward (it runs the backbone under a fused, chunked LM
head), so the latent loss needs its own `compute_loss`. Ours runs the GAP forward once, which fills the latent slots
(teacher targets, or closed-loop latents with `latent_feedback_training="self"`) and returns the latent loss, with
`logits_to_keep=1` so that no full logits are built; the final hidden states are read by a forward hook on the
backbone and scored by TRL's own chunked log-probability kernel, exactly as the stock trainer scores them.

Loss normalisation (the same under any split of an optimizer step into micro-batches and processes):

    loss = sum of token CE / (supervised tokens in the step)
           + latent_loss_weight * sum of latent-slot losses / (latent slots in the step)

where "the step" is every micro-batch of one optimizer step (gradient accumulation) on every process (when
`average_tokens_across_devices`, the default). CE is a mean per supervised token and the latent loss a mean per
latent slot (every latent-loss kind is a mean of per-slot terms), both over the whole optimizer batch: batch 2 x
accumulation 1, batch 1 x accumulation 2 and 2 processes x batch 1 give the same update. The counts are taken in
`get_batch_samples` (one all-reduce per step), before the micro-batches run. In evaluation each batch is normalised
by its own counts.

TRL's contract: the constructor takes `SFTTrainer`'s arguments in its order; the text loss is TRL's (`loss_type`
"nll" or "dft", `label_smoothing_factor`, `compute_loss_func`; equal to stock TRL's on the same rows without spans);
PEFT prompt tuning / P-tuning prepend their virtual tokens in front of the ids the GAP forward reads; TRL's dataset
formats train (`messages`, prompt-completion, plain text, `formatting_func`) with TRL's label masks; `padding_free`
concatenates each batch's rows (the same losses as padded) and `packing` ("bfd") packs whole rows into `max_length`
before training, each pack padding-free; what GAP cannot honour is refused when the trainer or its config is built
(`GapSFTConfig`). The README's "Fine-tune" section has the table.

Metrics added to TRL's (`entropy`, `mean_token_accuracy`, `num_tokens`), averaged over the logging window:
`ce_loss`, `latent_loss` (per slot), `latent_norm_ratio` (mean norm of the head's outputs / mean norm of the
targets), `latent_row_fraction` (fraction of rows with latent supervision). The latent ones are logged for the
micro-batches that have spans.
"""

import logging
import re
import warnings

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoProcessor
from trl import SFTTrainer
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import _use_triton
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, maybe_gather_lm_head_ctx

from modeling_gap.modeling_gap import VARLEN_SDPA

from .collator import (
    PACKED_ROWS,
    ROW_INDEX_COLUMN,
    GapDataCollator,
    PackedRows,
    pack_rows_bfd,
    validate_gap_dataset,
)
from .gap_sft_config import GapSFTConfig

logger = logging.getLogger(__name__)

DATASET_COLUMNS = ["images", "image", "messages", "prompt", "completion", "aux_images", "use_latent", "base_pass_rate",
                   ROW_INDEX_COLUMN, "gap_pack", PACKED_ROWS]


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


class GapSFTTrainer(SFTTrainer):
    """Supervised fine-tuning of a GAP model (`GapQwen2_5VLForConditionalGeneration`) with TRL.

    Takes the same arguments as [`~trl.SFTTrainer`]; `args` is a [`GapSFTConfig`] (a plain `SFTConfig` or
    `TrainingArguments` is converted with GAP's defaults). Datasets are in GAP's schema or TRL's other formats (see
    `trainers.schema`); the default collator is [`GapDataCollator`], and every row is checked up front when
    `args.validate_dataset`.
    `processing_class` must be a GAP processor (loaded from the model's path when omitted). LoRA / QLoRA: pass
    `peft_config=gap_lora_config(...)` (and a model loaded with `gap_quantization_config()`).
    """

    _tag_names = ["trl", "sft", "gap"]
    _name = "GAP SFT"

    def __init__(
        self,
        model,
        args: GapSFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "gap"
            args = GapSFTConfig(f"{name.rstrip('/').split('/')[-1]}-GAP-SFT")
        elif not isinstance(args, GapSFTConfig):
            fields = args.to_dict()
            fields["hub_token"] = args.hub_token
            fields["remove_unused_columns"] = False
            args = GapSFTConfig(**fields)
        # Rows are encoded on the fly by the collator: TRL's tokenization pass would drop the aux images.
        if args.dataset_kwargs is None or isinstance(args.dataset_kwargs, dict):
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if formatting_func is not None and args.completion_only_loss:
            raise ValueError(  # TRL's refusal: a formatted row is plain text, it has no completion
                "formatting_func turns rows into plain text, which has no completion: unset completion_only_loss."
            )
        if (args.padding_free or args.packing or args.eval_packing) and data_collator is not None:
            raise ValueError("padding_free / packing need GAP's collator: do not pass a data_collator (as in TRL).")

        if processing_class is None:
            path = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
            if not path:
                raise ValueError(
                    "Pass `processing_class` (a GapQwen2_5VLProcessor): the model has no path to load it from."
                )
            processing_class = AutoProcessor.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        if not hasattr(processing_class, "latent_token_ids"):
            raise TypeError(
                "processing_class must be a GAP processor (GapQwen2_5VLProcessor); got "
                f"{type(processing_class).__name__}."
            )
        if args.pad_token is not None:  # TRL sets it for its own collators only; ours reads it when built
            if args.pad_token not in processing_class.tokenizer.get_vocab():
                raise ValueError(f"pad_token {args.pad_token!r} is not in the tokenizer's vocabulary.")
            processing_class.tokenizer.pad_token = args.pad_token

        collator_options = dict(
            assistant_only_loss=args.assistant_only_loss, completion_only_loss=args.completion_only_loss,
            dataset_text_field=args.dataset_text_field, formatting_func=formatting_func,
        )
        self._collator_options = collator_options
        eval_packing = args.packing if args.eval_packing is None else args.eval_packing
        if train_dataset is not None:
            train_dataset = self._prepare_gap_dataset(train_dataset, processing_class, args, "train", args.packing)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: self._prepare_gap_dataset(value, processing_class, args, key, eval_packing)
                for key, value in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._prepare_gap_dataset(eval_dataset, processing_class, args, "eval", eval_packing)
        # Packing is padding-free over packs of whole rows (as TRL's "bfd" packing implies padding-free).
        padding_free = args.padding_free or args.packing or bool(eval_packing)

        if data_collator is None:
            data_collator = GapDataCollator(
                processing_class,
                max_length=args.max_length,
                capacity_guided=args.capacity_guided,
                capacity_threshold=args.capacity_threshold,
                pad_to_multiple_of=args.pad_to_multiple_of,
                escape_special_tokens=args.escape_special_tokens,
                return_row_indices=True,
                padding_free=padding_free,
                **collator_options,
            )

        # TRL refuses padding-free and packing for vision datasets, packs tokenized rows itself and swaps the chat
        # template for assistant-only masks; GAP does all of it itself, so TRL's constructor sees those fields off.
        hidden_from_trl = ("padding_free", "packing", "eval_packing", "assistant_only_loss")
        trl_values = {name: getattr(args, name) for name in hidden_from_trl}
        for name in hidden_from_trl:
            setattr(args, name, False)
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_loss_func=compute_loss_func,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                quantization_config=quantization_config,
                peft_config=peft_config,
                formatting_func=formatting_func,
            )
        finally:
            for name, value in trl_values.items():
                setattr(args, name, value)
        self.padding_free = padding_free
        self.completion_only_loss = args.completion_only_loss
        if args.loss_type == "dft" and args.label_smoothing_factor > 0:
            raise ValueError(  # TRL would silently drop the smoothing
                "label_smoothing_factor applies to loss_type='nll' only: unset it or use loss_type='nll'."
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        if _is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning:
            peft_type = str(getattr(unwrapped.active_peft_config.peft_type, "value", ""))
            if peft_type not in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
                raise ValueError(
                    f"PEFT {peft_type} is not supported (it needs its own labels or task ids): use prompt tuning, "
                    "P-tuning, prefix tuning, LoRA or another adapter."
                )
            if padding_free:
                raise ValueError(
                    f"padding_free / packing cannot give each row of a concatenated batch {peft_type}'s virtual "
                    "tokens: train it with padded batches (padding_free=False, packing=False)."
                )
            if args.latent_feedback_training == "self" and peft_type != "PREFIX_TUNING":
                raise ValueError(
                    f"latent_feedback_training='self' computes its closed-loop latents without {peft_type}'s virtual "
                    "tokens: use latent_feedback_training='teacher' with prompt learning."
                )

        base = self._gap_model()
        if not hasattr(base, "latent_head") or not hasattr(base.config, "latent_pad_token_id"):
            raise TypeError(f"GapSFTTrainer trains GAP models; got {type(base).__name__}.")
        # The trainer's settings win over the checkpoint's and are saved with it.
        if self.padding_free and base.config.text_config._attn_implementation == "sdpa":
            # The same attention, row by row: no (total, total) mask over the concatenated rows.
            base.config.text_config._attn_implementation = VARLEN_SDPA
            logger.info("padding_free: the text model's sdpa attention runs row by row (%s).", VARLEN_SDPA)
        base.config.latent_loss_weight = float(args.latent_loss_weight)
        base.config.latent_loss = args.latent_loss
        if args.freeze_vision_tower:
            base.model.visual.requires_grad_(False)
        if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
            # TRL casts every trainable parameter of a quantized model to bf16 (QLoRA's adapters); the latent head
            # reads full-precision hidden states and stays in the LM head's dtype.
            dtype = base.get_output_embeddings().weight.dtype
            for name, param in self.model.named_parameters():
                if "latent_head" in name and param.requires_grad:
                    param.data = param.data.to(dtype)
        self._latent_pad_id, self._latent_start_id, _ = base.config.latent_token_ids
        self._step_counts = None
        self._forward_redirection = _ForwardRedirection()

    # ---- datasets ------------------------------------------------------------------------------------------
    def _prepare_gap_dataset(self, dataset, processing_class, args: GapSFTConfig, name: str, packing: bool = False):
        import datasets

        if packing and not isinstance(dataset, datasets.Dataset):
            raise ValueError(f"packing needs a map-style datasets.Dataset (the {name} dataset is "
                             f"{type(dataset).__name__}): use padding_free=True instead.")

        if args.validate_dataset and isinstance(dataset, datasets.Dataset):
            summary = validate_gap_dataset(
                dataset, processing_class, max_length=args.max_length, capacity_guided=args.capacity_guided,
                capacity_threshold=args.capacity_threshold, escape_special_tokens=args.escape_special_tokens,
                **self._collator_options,
            )
            logger.info("%s dataset checked: %s", name, summary)

        # Let the collator's errors name dataset rows. A dataset with an indices mapping (after select / shuffle)
        # would be rewritten by `add_column`; its errors name batch positions instead (validation names rows).
        if (
            isinstance(dataset, datasets.Dataset)
            and ROW_INDEX_COLUMN not in dataset.column_names
            and dataset._indices is None
        ):
            dataset = dataset.add_column(ROW_INDEX_COLUMN, list(range(len(dataset))))
        if args.shuffle_dataset and isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
            dataset = dataset.shuffle(seed=args.seed)  # as TRL does, once, before training
        if packing:
            dataset = self._pack_gap_dataset(dataset, processing_class, args, name)
        return dataset

    def _pack_gap_dataset(self, dataset, processing_class, args: GapSFTConfig, name: str):
        """Packs of whole rows of at most `max_length` tokens (best-fit decreasing over each row's encoded length,
        one processor pass per row), as a dataset whose items are the lists of their rows."""
        import datasets

        collator = GapDataCollator(
            processing_class, max_length=args.max_length, capacity_guided=args.capacity_guided,
            capacity_threshold=args.capacity_threshold, escape_special_tokens=args.escape_special_tokens,
            **self._collator_options,
        )
        lengths = [
            int(collator.encode_row(row, row.get(ROW_INDEX_COLUMN, index))["input_ids"].shape[0])
            for index, row in enumerate(dataset)
        ]
        packs = pack_rows_bfd(lengths, args.max_length)
        logger.info("%s dataset: %d rows packed into %d packs of <= %d tokens", name, len(lengths), len(packs),
                    args.max_length)
        packed = datasets.Dataset.from_dict({"gap_pack": packs})
        packed.set_transform(PackedRows(dataset))
        return packed

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*DATASET_COLUMNS, self.args.dataset_text_field]

    # ---- the model -----------------------------------------------------------------------------------------
    def _gap_model(self):
        """The GAP model itself, under any accelerate wrapper (DDP, FSDP) and PEFT."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if _is_peft_model(model):
            model = model.get_base_model()
        return model

    # ---- loss normalisation: counts over the whole optimizer step --------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_counts = None
        if batch_samples:
            tokens = sum(int((batch["labels"][..., 1:] != -100).sum()) for batch in batch_samples)
            slots = sum(int((batch["input_ids"] == self._latent_pad_id).sum()) for batch in batch_samples)
            counts = torch.tensor([tokens, slots], dtype=torch.long, device=device)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            self._step_counts = counts
        return batch_samples, num_items_in_batch

    # ---- the loss ------------------------------------------------------------------------------------------
    def _closed_loop_latents(self, base, forward_inputs: dict):
        """The head's own latents for every slot of the batch (no gradient, eval mode: no EMA update). Every rank
        runs as many passes (the most any rank needs), so that sharded weights are gathered in step."""
        slots = forward_inputs["input_ids"] == self._latent_pad_id
        if "position_ids" in forward_inputs and "attention_mask" not in forward_inputs:  # padding-free: per row
            row_of_token = (forward_inputs["position_ids"].reshape(-1) == 0).cumsum(0) - 1
            slots = torch.zeros(int(row_of_token[-1]) + 1, dtype=torch.long, device=slots.device).index_add_(
                0, row_of_token.to(slots.device), slots.reshape(-1).long())
        passes = slots.sum(-1).max().reshape(1) if slots.dtype == torch.bool else slots.max().reshape(1)
        if self.accelerator.num_processes > 1:
            passes = self.accelerator.gather(passes).max()
        was_training = base.training
        base.eval()
        try:
            with torch.no_grad():
                return base.closed_loop_latent_inputs(num_passes=max(int(passes), 1), **forward_inputs)
        finally:
            base.train(was_training)

    @staticmethod
    def _token_log_probs(base, hidden_states: torch.Tensor, labels: torch.Tensor):
        """TRL's fused LM-head scoring of (batch, seq, hidden) final states against next-token labels:
        `(log_probs, entropy, is_top1, mask)`, each (batch, seq - 1), zero where the label is -100."""
        lm_head = base.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        hidden_states = hidden_states[:, :-1].to(weight.device)
        labels = labels[:, 1:].to(weight.device)
        mask = labels != -100
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        compact = _use_triton(hidden_states.device)
        with maybe_gather_lm_head_ctx(weight, bias):
            per_token = ChunkedLogProbFunction.apply(
                hidden_states[mask] if compact else hidden_states.reshape(-1, hidden_states.size(-1)),
                weight,
                bias,
                labels[mask] if compact else labels.clamp(min=0).reshape(-1),
                1.0,
                _CHUNKED_LOGPROB_CHUNK_SIZE,
                None,
                1.0,
                ("log_probs", "entropy", "is_top1"),
            )
        if compact:
            per_token = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token]
        else:
            per_token = [None if x is None else x.view(mask.shape).masked_fill(~mask, 0) for x in per_token]
        log_probs, entropy, _, _, is_top1 = per_token
        return log_probs, entropy, is_top1, mask

    # ---- PEFT prompt learning (prompt tuning, P-tuning) ----------------------------------------------------------
    def _prompt_learning_model(self):
        """The `PeftModel` when its adapter prepends virtual tokens to the input embeddings, else None. (Prefix tuning
        feeds its virtual tokens through the cache and runs through PEFT's own forward.)"""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if not _is_peft_model(model):
            return None
        config = model.active_peft_config
        if not config.is_prompt_learning or config.peft_type in ("PREFIX_TUNING", "CARTRIDGE"):
            return None
        return model

    def _forward_with_virtual_tokens(self, peft_model, **inputs):
        """The GAP forward with the adapter's virtual tokens in front of every row.

        PEFT's own prompt-learning forward passes only `inputs_embeds` on, which loses what the GAP forward reads from
        `input_ids` (image and latent slots, M-RoPE positions). Here the ids get as many filler ids in front (the pad
        token: neither an image nor a latent slot; text positions 0..V-1, as PEFT gives a text model) and the
        embeddings the virtual tokens; the outputs' states and logits are then V longer than the labels.
        """
        base = peft_model.get_base_model()
        input_ids = inputs.pop("input_ids")
        batch_size, num_virtual = input_ids.shape[0], peft_model.active_peft_config.num_virtual_tokens
        embeddings = base.get_input_embeddings()(input_ids)
        prompts = peft_model.get_prompt(batch_size=batch_size).to(embeddings.dtype)
        tokenizer = self.processing_class.tokenizer
        filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        inputs["input_ids"] = torch.cat([input_ids.new_full((batch_size, num_virtual), filler), input_ids], dim=1)
        inputs["inputs_embeds"] = torch.cat([prompts, embeddings], dim=1)
        for key in ("attention_mask", "mm_token_type_ids"):
            if inputs.get(key) is not None:
                value = inputs[key]
                fill = value.new_ones if key == "attention_mask" else value.new_zeros
                inputs[key] = torch.cat([fill((batch_size, num_virtual)), value], dim=1)
        return base.forward(**inputs)

    # ---- the loss ------------------------------------------------------------------------------------------
    def _text_loss_sum(self, log_probs: torch.Tensor, logits: torch.Tensor | None, mask: torch.Tensor):
        """Sum over the supervised tokens of TRL's per-token text loss for `args.loss_type` and
        `args.label_smoothing_factor` (see `compute_loss`)."""
        if self.args.loss_type == "dft":  # DFT (https://huggingface.co/papers/2508.05629), as TRL computes it
            return -(log_probs * log_probs.exp().detach()).sum()
        epsilon = self.args.label_smoothing_factor
        if epsilon > 0:  # transformers' LabelSmoother, per token: (1 - e) * NLL + e * mean over the vocabulary
            all_log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            smoothed = -(all_log_probs.sum(-1) * mask).sum() / all_log_probs.shape[-1]
            return (1 - epsilon) * -log_probs.sum() + epsilon * smoothed
        return -log_probs.sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's SFT loss on the text (`loss_type` "nll" or "dft", `label_smoothing_factor`, or `compute_loss_func`)
        plus `latent_loss_weight` x the latent loss, normalised over the optimizer step (module docstring).

        The text loss needs the full logits only for label smoothing, `compute_loss_func` and `return_outputs=True`
        (then, as in TRL, the logits are built; `return_outputs=True` warns as TRL does); otherwise the final states
        are scored by TRL's chunked kernel without them.
        """
        mode = "train" if self.model.training else "eval"
        base = self._gap_model()
        labels = inputs["labels"]
        rows = inputs.get("gap_row_indices")
        forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "gap_row_indices")}
        forward_inputs["use_cache"] = False
        if self.args.latent_feedback_training == "self":
            forward_inputs["latent_inputs"] = self._closed_loop_latents(base, forward_inputs)
        smoothing = self.args.label_smoothing_factor > 0 and self.args.loss_type == "nll"
        full_logits = return_outputs or self.compute_loss_func is not None or smoothing
        forward_inputs["logits_to_keep"] = 0 if full_logits else 1

        prompt_learning = self._prompt_learning_model()

        def forward_and_score(**kwargs):
            # Runs as the GAP model's own forward (redirected through every wrapper: DeepSpeed, DDP, PEFT), so
            # that the LM head's weight, gathered here under ZeRO-3, is used where its gradient hooks are armed.
            # Under PEFT prompt learning it replaces the PeftModel's forward and prepends the virtual tokens itself.
            captured = {}

            def keep_hidden_states(module, args, output):
                captured["hidden_states"] = output.last_hidden_state

            handle = base.model.register_forward_hook(keep_hidden_states)
            try:
                if prompt_learning is not None:
                    outputs = self._forward_with_virtual_tokens(prompt_learning, **kwargs)
                else:
                    outputs = base.forward(**kwargs)
            finally:
                handle.remove()
            hidden_states = captured["hidden_states"]
            num_virtual = hidden_states.shape[1] - labels.shape[1]  # PEFT's virtual tokens, in front
            if num_virtual:
                hidden_states = hidden_states[:, num_virtual:]
                if outputs.logits is not None and outputs.logits.shape[1] > labels.shape[1]:
                    outputs.logits = outputs.logits[:, num_virtual:]
            return outputs, self._token_log_probs(base, hidden_states, labels)

        try:
            outputs, scores = self._forward_redirection(
                model, base if prompt_learning is None else prompt_learning, forward_and_score, **forward_inputs
            )
        except ValueError as error:
            if rows is None:
                raise
            # The model names batch positions ("Row 1: ..."): say which dataset rows they are.
            named = re.sub(r"\bRow (\d+)", lambda m: f"Batch row {m.group(1)} (dataset row "
                           f"{rows[int(m.group(1))].item() if int(m.group(1)) < len(rows) else '?'})", str(error))
            raise ValueError(f"{named} [dataset rows of this batch: {rows.tolist()}]") from error

        log_probs, entropy, is_top1, mask = scores
        ce_sum = -log_probs.sum()
        num_tokens = mask.sum()
        text_sum = self._text_loss_sum(log_probs, outputs.logits if full_logits else None, mask)
        weight = self.args.latent_loss_weight
        has_spans = outputs.latent_loss is not None
        num_slots = outputs.latent_predictions.shape[0] * outputs.latent_predictions.shape[1] if has_spans else 0
        latent_sum = outputs.latent_loss.float() * num_slots if has_spans else None
        if mode == "train" and self._step_counts is not None:
            step_tokens, step_slots = self._step_counts.to(ce_sum.device).clamp(min=1)
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            if self.compute_loss_func is not None:  # as TRL calls it: normalised by the step's token count
                loss = self.compute_loss_func(outputs, labels, num_items_in_batch=step_tokens)
            else:
                loss = text_sum / step_tokens
            if has_spans and weight > 0:
                loss = loss + weight * latent_sum / step_slots
            loss = loss * scale
            self.loss_is_scaled_for_ga = True  # already a share of the whole step's mean
        else:
            if self.compute_loss_func is not None:
                loss = self.compute_loss_func(outputs, labels, num_items_in_batch=None)
            else:
                loss = text_sum / num_tokens.clamp(min=1)
            if has_spans and weight > 0:
                loss = loss + weight * outputs.latent_loss.float()
            self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides by the accumulation steps
        if not has_spans and outputs.latent_predictions is not None:
            # The head ran on no rows (see the model's forward): its zero term gives its weights a zero gradient,
            # so that every rank reduces the same gradients whether or not its batch had spans.
            loss = loss + outputs.latent_predictions.sum() * 0

        self._log_gap_metrics(mode, inputs, outputs, ce_sum, num_tokens, latent_sum, num_slots, entropy, is_top1)
        if return_outputs:
            warnings.warn(  # TRL's deprecation, word for word
                "`return_outputs=True`, and the logits it passes to `compute_metrics` and "
                "`preprocess_logits_for_metrics`, are deprecated and will be removed in v2.0.0. The fused LM head does "
                "not build the logits, so they are recomputed with an extra forward pass.",
                FutureWarning,
                stacklevel=2,
            )
            return loss, outputs
        return loss

    @torch.no_grad()
    def _log_gap_metrics(self, mode, inputs, outputs, ce_sum, num_tokens, latent_sum, num_slots, entropy, is_top1):
        device = ce_sum.device
        zero = torch.zeros((), device=device)
        has_spans = latent_sum is not None
        if has_spans:
            prediction_norms = outputs.latent_predictions.detach().float().norm(dim=-1).sum()
            target_norms = outputs.latent_targets.detach().float().norm(dim=-1).sum()
        span_starts = inputs["input_ids"] == self._latent_start_id
        if "position_ids" in inputs and "attention_mask" not in inputs:  # padding-free: rows restart at position 0
            row_of_token = (inputs["position_ids"].reshape(-1) == 0).cumsum(0) - 1
            num_rows = int(row_of_token[-1]) + 1
            rows_with_spans = row_of_token[span_starts.reshape(-1)].unique().numel()
            rows_with_spans = torch.tensor(rows_with_spans, device=device)
            attended_tokens = torch.tensor(float(inputs["input_ids"].numel()), device=device)
        else:
            num_rows = inputs["input_ids"].shape[0]
            rows_with_spans = span_starts.any(-1).sum()
            attended_tokens = inputs["attention_mask"].sum().float()
        stats = torch.stack([
            ce_sum.detach().float(),
            num_tokens.float(),
            latent_sum.detach().float() if has_spans else zero,
            torch.tensor(float(num_slots), device=device),
            prediction_norms.to(device) if has_spans else zero,
            target_norms.to(device) if has_spans else zero,
            rows_with_spans.float().to(device),
            torch.tensor(float(num_rows), device=device),
            entropy.detach().float().sum(),
            is_top1.float().sum(),
            attended_tokens.to(device),
        ])
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        (ce, tokens, latent, slots, prediction_norms, target_norms, rows_with_spans, rows, entropy_sum, correct,
         attended) = stats.tolist()
        metrics = self._metrics[mode]
        metrics["ce_loss"].append(ce / max(tokens, 1))
        metrics["entropy"].append(entropy_sum / tokens if tokens else 0.0)
        metrics["mean_token_accuracy"].append(correct / tokens if tokens else 0.0)
        metrics["latent_row_fraction"].append(rows_with_spans / max(rows, 1))
        if slots > 0:
            metrics["latent_loss"].append(latent / slots)
            metrics["latent_norm_ratio"].append(prediction_norms / target_norms if target_norms > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(attended) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


__all__ = ["GapSFTTrainer"]
