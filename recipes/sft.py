"""Supervised fine-tuning of a GAP model with `GapSFTTrainer` (text CE + latent alignment loss, capacity-guided).

    # the tiny offline demo (CPU, about a minute)
    python recipes/sft.py --config recipes/tiny/gap/config_demo.yaml

    # several processes (DDP; on CPU the recipe's `use_cpu: true` makes it gloo)
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml --num_processes 2 \\
        recipes/sft.py --config recipes/tiny/gap/config_demo.yaml --output_dir outputs/tiny-gap-ddp

    # a real run: a GAP checkpoint (or a stock Qwen2.5-VL, converted on the fly) on a dataset in GAP's schema,
    # LoRA on the language model, the latent head trained in full
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/sft.py \\
        --model_name_or_path outputs/gap-7b-pca --dataset_name data/monet-gap --use_peft \\
        --bf16 true --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --output_dir outputs/gap-7b-sft

Every field of `GapScriptArguments`, `GapSFTConfig` (TRL's `SFTConfig` plus GAP's fields) and TRL's `ModelConfig` can
be set in the YAML given by `--config` and overridden on the command line.

Model (`--model_name_or_path`):
- `tiny`: a tiny random GAP model built on the fly (`modeling_gap.tiny.build_tiny_gap`, text width
  `tiny_hidden_size`, `tiny_num_layers` layers, seeded by `--seed`): offline, for demos and tests;
- a GAP checkpoint (directory or Hub id): loaded as it is;
- a stock Qwen2.5-VL checkpoint: converted with `from_qwen2_5_vl` (latent tokens added, fresh latent head; set
  `fit_pca_rows` to fit the head's PCA on the training images, or run `recipes/fit_pca.py` first).
`--use_peft` wraps it with LoRA on the language model's projections, the latent head trained in full
(`trainers.gap_lora_config`); `--load_in_4bit` / `--load_in_8bit` quantize the language model only (QLoRA).

Data (`--dataset_name`): `synthetic` draws the offline framed-square task (`trainers.synthetic`, `synthetic_*`
fields); otherwise a `save_to_disk` directory (a `Dataset` or a `DatasetDict`) or a Hub dataset id, split
`dataset_train_split` (and `dataset_test_split` for evaluation when `eval_strategy` is not `no`).

The run resumes by itself from the last checkpoint in `output_dir` (unless `--resume_from_checkpoint` names one), and
saves the model (with its remote code) and the processor to `output_dir` at the end; with `merge_adapter`, a LoRA
run also writes the merged GAP checkpoint to `output_dir/merged`.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from trl import ModelConfig, ScriptArguments, TrlParser  # noqa: E402

from trainers.gap_sft_config import GapSFTConfig  # noqa: E402

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny"
SYNTHETIC_DATASET = "synthetic"


@dataclass
class GapScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` (dataset name, config, splits) plus the tiny model, the synthetic task, the PCA fit."""

    synthetic_rows: int = field(default=256, metadata={"help": "Training rows of the synthetic task."})
    synthetic_eval_rows: int = field(default=64, metadata={"help": "Evaluation rows of the synthetic task."})
    synthetic_image_size: int = field(default=56, metadata={"help": "Board image side in pixels (56 to 112)."})
    synthetic_grid: int = field(default=2, metadata={"help": "Cells per side of the synthetic board."})
    synthetic_num_colors: int = field(default=4, metadata={"help": "Colours of the synthetic task (chance = 1/n)."})
    synthetic_use_latent_fraction: float | None = field(
        default=None, metadata={"help": "Add a random use_latent column, True with this probability."}
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "Text width of the 'tiny' model."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Decoder layers of the 'tiny' model."})
    num_latent_tokens: int | None = field(
        default=None, metadata={"help": "K, for the 'tiny' model and stock conversion (default: 4 tiny, 8 stock)."}
    )
    latent_feedback: str | None = field(
        default=None, metadata={"help": "Feedback mode (pca | ema_norm | raw), for 'tiny' and stock conversion."}
    )
    fit_pca_rows: int = field(
        default=0, metadata={"help": "Fit the head's PCA on the images of the first N training rows (0: no fit)."}
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "With LoRA, also save the merged GAP checkpoint to output_dir/merged."}
    )


def load_model_and_processor(script_args: GapScriptArguments, training_args: GapSFTConfig, model_args: ModelConfig):
    """(model, processor) from `model_args.model_name_or_path`: `tiny`, a GAP checkpoint or a stock Qwen2.5-VL."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from modeling_gap import GapQwen2_5VLProcessor, from_qwen2_5_vl
    from modeling_gap.tiny import build_tiny_gap
    from trainers.gap_sft_config import gap_quantization_config

    name = model_args.model_name_or_path
    if not name:
        raise SystemExit("--model_name_or_path is required ('tiny', a GAP checkpoint or a stock Qwen2.5-VL).")
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    gap_options = {}
    if script_args.num_latent_tokens is not None:
        gap_options["num_latent_tokens"] = script_args.num_latent_tokens
    if script_args.latent_feedback is not None:
        gap_options["latent_feedback"] = script_args.latent_feedback
    quantization = None
    if model_args.load_in_4bit or model_args.load_in_8bit:
        quantization = gap_quantization_config(
            load_in_4bit=model_args.load_in_4bit, load_in_8bit=model_args.load_in_8bit,
            quant_type=model_args.bnb_4bit_quant_type, double_quant=model_args.use_bnb_nested_quant,
            compute_dtype=dtype if isinstance(dtype, torch.dtype) else None,
        )

    if name == TINY_MODEL:
        if quantization is not None:
            raise SystemExit("Quantization needs a checkpoint: save the tiny model first (recipes/make_tiny.py).")
        model, processor = build_tiny_gap(
            seed=training_args.seed, hidden_size=script_args.tiny_hidden_size,
            num_layers=script_args.tiny_num_layers, **gap_options,
        )
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        # Qwen2.5-VL-Instruct ends a turn with <|im_end|>: make it the tokenizer's eos, as the model's config has it
        # (the Trainer otherwise aligns the model's eos on the tokenizer's <|endoftext|>).
        processor.tokenizer.eos_token = "<|im_end|>"
        return model, processor

    revision = model_args.model_revision
    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=training_args.trust_remote_code)
    if config.model_type == "qwen2_5_vl":
        if quantization is not None:
            raise SystemExit(
                "Convert the stock checkpoint first (recipes/fit_pca.py), then quantize the GAP checkpoint."
            )
        return from_qwen2_5_vl(name, dtype=dtype if dtype is not None else "auto", **gap_options)
    # A quantized model is placed at load time: each process on its own GPU, not all on GPU 0.
    device_map = None
    if quantization is not None and torch.cuda.is_available():
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}
    model = AutoModelForImageTextToText.from_pretrained(
        name, revision=revision, dtype=dtype, quantization_config=quantization, device_map=device_map,
        attn_implementation=model_args.attn_implementation, trust_remote_code=training_args.trust_remote_code,
    )
    try:
        processor = AutoProcessor.from_pretrained(
            name, revision=revision, trust_remote_code=training_args.trust_remote_code
        )
    except (ImportError, ValueError, TypeError):  # no torchvision: the stock processor class cannot be built
        processor = GapQwen2_5VLProcessor.from_stock_pretrained(name, revision=revision)
    return model, processor


def load_datasets(script_args: GapScriptArguments, training_args: GapSFTConfig):
    """(train, eval or None) in GAP's schema."""
    import datasets

    from trainers.synthetic import make_synthetic_dataset

    wants_eval = str(training_args.eval_strategy) not in ("no", "IntervalStrategy.NO")
    name = script_args.dataset_name
    if not name:
        raise SystemExit("--dataset_name is required ('synthetic', a save_to_disk directory or a Hub dataset id).")
    if name == SYNTHETIC_DATASET:
        options = dict(
            image_size=script_args.synthetic_image_size, grid=script_args.synthetic_grid,
            num_colors=script_args.synthetic_num_colors, use_latent_fraction=script_args.synthetic_use_latent_fraction,
        )
        train = make_synthetic_dataset(script_args.synthetic_rows, seed=training_args.seed, **options)
        evaluation = None
        if wants_eval and script_args.synthetic_eval_rows:
            evaluation = make_synthetic_dataset(script_args.synthetic_eval_rows, seed=training_args.seed + 1, **options)
        return train, evaluation
    if os.path.isdir(name):
        loaded = datasets.load_from_disk(name)
    else:
        loaded = datasets.load_dataset(name, script_args.dataset_config)
    if isinstance(loaded, datasets.Dataset):
        return loaded, None
    train = loaded[script_args.dataset_train_split]
    evaluation = None
    if wants_eval and script_args.dataset_test_split in loaded:
        evaluation = loaded[script_args.dataset_test_split]
    return train, evaluation


def fit_pca_on_rows(model, processor, dataset, num_rows: int) -> int:
    """Fit the latent head's PCA (and `ema_norm`) on the question and aux images of the first `num_rows` rows."""
    from modeling_gap import fit_latent_head_pca

    images = []
    for row in dataset.select(range(min(num_rows, len(dataset)))):
        images.extend(image.convert("RGB") for image in (row.get("images") or []) + (row.get("aux_images") or []))
    stats = fit_latent_head_pca(model, images, image_processor=processor.image_processor)
    return stats["count"]


def main(script_args: GapScriptArguments, training_args: GapSFTConfig, model_args: ModelConfig, callbacks=None):
    """Train; returns the trainer. `callbacks` are extra `TrainerCallback`s."""
    from transformers.trainer_utils import get_last_checkpoint

    from trainers.gap_sft_config import gap_lora_config
    from trainers.gap_sft_trainer import GapSFTTrainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model, processor = load_model_and_processor(script_args, training_args, model_args)
    train_dataset, eval_dataset = load_datasets(script_args, training_args)
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
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=callbacks,
    )

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and os.path.isdir(training_args.output_dir):
        checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint is not None:
            logger.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(training_args.output_dir)
        if peft_config is not None and script_args.merge_adapter:
            merged_dir = os.path.join(training_args.output_dir, "merged")
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(merged_dir)
            processor.save_pretrained(merged_dir)
    trainer.accelerator.wait_for_everyone()
    logger.info("saved to %s", training_args.output_dir)
    return trainer


def make_parser() -> TrlParser:
    return TrlParser((GapScriptArguments, GapSFTConfig, ModelConfig))


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a process group left open aborts the process at exit
