"""Supervised fine-tuning of a GAP model with `GapSFTTrainer` (text CE + latent alignment loss, capacity-guided): the
`gap sft` stage.

Model (`--model_name_or_path`, `trainers.model_loader.load_model`): `tiny` (built on the fly), a GAP checkpoint
(loaded as it is), or a stock Qwen2.5-VL (converted; set `fit_pca_rows` to fit the head's PCA on the training
images, or run `gap fit-pca` first). `--use_peft` wraps it with LoRA on the language model's projections, the
latent head trained in full; `--load_in_4bit` / `--load_in_8bit` quantize the language model only (QLoRA).

Data (`--dataset_name`, `trainers.dataset_loader`): `synthetic`, a `save_to_disk` directory or a Hub dataset id.

The run resumes by itself from the last checkpoint in `output_dir` (unless `--resume_from_checkpoint` names one). A
finished run (its `train_results.json` written) is not trained again: it says so and stops, unless
`--overwrite_output_dir` asks for a new run from scratch or `--resume_from_checkpoint` names where to continue. The model (with its remote code) and the processor are
saved to `output_dir` at the end; with `merge_adapter`, a LoRA run also writes the merged GAP checkpoint to
`output_dir/merged`.
"""

import logging
import os
import shutil

from .dataset_loader import load_training_datasets
from .model_loader import gap_lora_config, gap_quantization_config, load_model, resolve_dtype
from .pca_fit import fit_pca_on_rows

logger = logging.getLogger(__name__)
FINISHED_MARKER = "train_results.json"


def load_sft_model(script_args, training_args, model_args):
    """(model, processor) for training, from the three parsed dataclasses."""
    import torch

    dtype = resolve_dtype(model_args.dtype)
    quantization = None
    if model_args.load_in_4bit or model_args.load_in_8bit:
        quantization = gap_quantization_config(
            load_in_4bit=model_args.load_in_4bit, load_in_8bit=model_args.load_in_8bit,
            quant_type=model_args.bnb_4bit_quant_type, double_quant=model_args.use_bnb_nested_quant,
            compute_dtype=dtype if isinstance(dtype, torch.dtype) else None,
        )
    return load_model(
        model_args.model_name_or_path, stock="convert", dtype=dtype, revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation, quantization=quantization, seed=training_args.seed,
        gap_options=dict(num_latent_tokens=script_args.num_latent_tokens, latent_feedback=script_args.latent_feedback),
        tiny_options=dict(hidden_size=script_args.tiny_hidden_size, num_layers=script_args.tiny_num_layers),
        trust_remote_code=training_args.trust_remote_code, allow_pickle_weights=script_args.allow_pickle_weights,
    )


# What `accelerate launch` sets for a config that accelerate runs on GPUs only (on a machine without one, every process
# would train alone, on the same output_dir). DeepSpeed is not here: it runs on CPU processes too (its CPU accelerator
# over gloo).
GPU_ONLY_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP"}


def check_launch():
    """Refuse, in one line, a launch that cannot do what its accelerate config says on this machine."""
    import torch

    if torch.cuda.is_available():
        return
    for variable, name in GPU_ONLY_LAUNCHES.items():
        if os.environ.get(variable, "").lower() == "true":
            raise ValueError(
                f"this launch asks for {name} (its accelerate config), which accelerate runs on GPUs only and this "
                "machine has none: on CPU every process would train alone. Use "
                "recipes/accelerate_configs/zero3.yaml (DeepSpeed ZeRO-3) or ddp.yaml here, or run on GPUs."
            )


def finished_run(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, FINISHED_MARKER))


def train(script_args, training_args, model_args, callbacks=None):
    """`gap sft`: train and save; returns the trainer (None when `output_dir` already holds a finished run)."""
    from transformers.trainer_utils import get_last_checkpoint

    from .gap_sft_trainer import GapSFTTrainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_launch()
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required ('tiny', a GAP checkpoint or a stock Qwen2.5-VL).")
    output_dir = training_args.output_dir
    if finished_run(output_dir) and training_args.resume_from_checkpoint is None:
        if not script_args.overwrite_output_dir:
            print(f"{output_dir} holds a finished run ({FINISHED_MARKER}): nothing to train. Pass "
                  "--overwrite_output_dir to train again from scratch, or choose another --output_dir.")
            return None
        if training_args.process_index == 0:
            shutil.rmtree(output_dir)
    model, processor = load_sft_model(script_args, training_args, model_args)
    wants_eval = str(training_args.eval_strategy) not in ("no", "IntervalStrategy.NO")
    train_dataset, eval_dataset = load_training_datasets(script_args, training_args.seed, wants_eval)
    if script_args.fit_pca_rows:
        count = fit_pca_on_rows(model, processor, train_dataset, script_args.fit_pca_rows)
        logger.info("fitted the latent head's PCA on %d visual vectors", count)

    peft_config = None
    if model_args.use_peft:
        peft_config = gap_lora_config(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules, modules_to_save=model_args.lora_modules_to_save,
            use_rslora=model_args.use_rslora, use_dora=model_args.use_dora,
        )
    trainer = GapSFTTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=processor, peft_config=peft_config, callbacks=callbacks,
    )
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and os.path.isdir(output_dir):
        checkpoint = get_last_checkpoint(output_dir)
        if checkpoint is not None:
            logger.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(output_dir)
        if peft_config is not None and script_args.merge_adapter:
            merged_dir = os.path.join(output_dir, "merged")
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(merged_dir)
            processor.save_pretrained(merged_dir)
    trainer.save_state()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)  # written last: it marks the run finished
    trainer.accelerator.wait_for_everyone()
    logger.info("saved to %s", output_dir)
    return trainer


__all__ = ["FINISHED_MARKER", "check_launch", "finished_run", "load_sft_model", "train"]
