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

Metrics added to TRL's (`entropy`, `mean_token_accuracy`, `num_tokens`), averaged over the logging window:
`ce_loss`, `latent_loss` (per slot), `latent_norm_ratio` (mean norm of the head's outputs / mean norm of the
targets), `latent_row_fraction` (fraction of rows with latent supervision). The latent ones are logged for the
micro-batches that have spans.
"""

import logging
import re

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoProcessor
from trl import SFTTrainer
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import _use_triton
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, maybe_gather_lm_head_ctx

from .collator import ROW_INDEX_COLUMN, GapDataCollator, validate_gap_dataset
from .gap_sft_config import GapSFTConfig

logger = logging.getLogger(__name__)

DATASET_COLUMNS = ["images", "image", "messages", "aux_images", "use_latent", "base_pass_rate", ROW_INDEX_COLUMN]


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


class GapSFTTrainer(SFTTrainer):
    """Supervised fine-tuning of a GAP model (`GapQwen2_5VLForConditionalGeneration`) with TRL.

    Takes the same arguments as [`~trl.SFTTrainer`]; `args` is a [`GapSFTConfig`] (a plain `SFTConfig` or
    `TrainingArguments` is converted with GAP's defaults). Datasets are in GAP's schema (see `trainers.schema`); the
    default collator is [`GapDataCollator`], and every row is checked up front when `args.validate_dataset`.
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
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
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

        if train_dataset is not None:
            train_dataset = self._prepare_gap_dataset(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: self._prepare_gap_dataset(value, processing_class, args, key)
                for key, value in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._prepare_gap_dataset(eval_dataset, processing_class, args, "eval")

        if data_collator is None:
            data_collator = GapDataCollator(
                processing_class,
                max_length=args.max_length,
                capacity_guided=args.capacity_guided,
                capacity_threshold=args.capacity_threshold,
                pad_to_multiple_of=args.pad_to_multiple_of,
                escape_special_tokens=args.escape_special_tokens,
                return_row_indices=True,
            )

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

        base = self._gap_model()
        if not hasattr(base, "latent_head") or not hasattr(base.config, "latent_pad_token_id"):
            raise TypeError(f"GapSFTTrainer trains GAP models; got {type(base).__name__}.")
        # The trainer's settings win over the checkpoint's and are saved with it.
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
    @staticmethod
    def _prepare_gap_dataset(dataset, processing_class, args: GapSFTConfig, name: str):
        import datasets

        if args.validate_dataset and isinstance(dataset, datasets.Dataset):
            summary = validate_gap_dataset(
                dataset, processing_class, max_length=args.max_length, capacity_guided=args.capacity_guided,
                capacity_threshold=args.capacity_threshold, escape_special_tokens=args.escape_special_tokens,
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
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(DATASET_COLUMNS)

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
        passes = (forward_inputs["input_ids"] == self._latent_pad_id).sum(-1).max().reshape(1)
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        base = self._gap_model()
        labels = inputs["labels"]
        rows = inputs.get("gap_row_indices")
        forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "gap_row_indices")}
        forward_inputs["use_cache"] = False
        if self.args.latent_feedback_training == "self":
            forward_inputs["latent_inputs"] = self._closed_loop_latents(base, forward_inputs)

        def forward_and_score(**kwargs):
            # Runs as the GAP model's own forward (redirected through every wrapper: DeepSpeed, DDP, PEFT), so
            # that the LM head's weight, gathered here under ZeRO-3, is used where its gradient hooks are armed.
            captured = {}

            def keep_hidden_states(module, args, output):
                captured["hidden_states"] = output.last_hidden_state

            handle = base.model.register_forward_hook(keep_hidden_states)
            try:
                outputs = base.forward(**kwargs)
            finally:
                handle.remove()
            return outputs, self._token_log_probs(base, captured["hidden_states"], labels)

        try:
            outputs, scores = self._forward_redirection(
                model, base, forward_and_score, **forward_inputs, logits_to_keep=0 if return_outputs else 1
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
        weight = self.args.latent_loss_weight
        has_spans = outputs.latent_loss is not None
        num_slots = outputs.latent_predictions.shape[0] * outputs.latent_predictions.shape[1] if has_spans else 0
        latent_sum = outputs.latent_loss.float() * num_slots if has_spans else None
        if not has_spans and outputs.latent_predictions is not None:
            # The head ran on no rows (see the model's forward): its zero term gives its weights a zero gradient,
            # so that every rank reduces the same gradients whether or not its batch had spans.
            ce_sum = ce_sum + outputs.latent_predictions.sum() * 0

        if mode == "train" and self._step_counts is not None:
            step_tokens, step_slots = self._step_counts.to(ce_sum.device).clamp(min=1)
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            loss = ce_sum / step_tokens
            if has_spans and weight > 0:
                loss = loss + weight * latent_sum / step_slots
            loss = loss * scale
            self.loss_is_scaled_for_ga = True  # already a share of the whole step's mean
        else:
            loss = ce_sum / num_tokens.clamp(min=1)
            if has_spans and weight > 0:
                loss = loss + weight * outputs.latent_loss.float()
            self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides by the accumulation steps

        self._log_gap_metrics(mode, inputs, outputs, ce_sum, num_tokens, latent_sum, num_slots, entropy, is_top1)
        if return_outputs:
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
        rows_with_spans = (inputs["input_ids"] == self._latent_start_id).any(-1).sum()
        stats = torch.stack([
            ce_sum.detach().float(),
            num_tokens.float(),
            latent_sum.detach().float() if has_spans else zero,
            torch.tensor(float(num_slots), device=device),
            prediction_norms.to(device) if has_spans else zero,
            target_norms.to(device) if has_spans else zero,
            rows_with_spans.float().to(device),
            torch.tensor(float(inputs["input_ids"].shape[0]), device=device),
            entropy.detach().float().sum(),
            is_top1.float().sum(),
            inputs["attention_mask"].sum().float().to(device),
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
