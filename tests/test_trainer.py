"""`GapSFTTrainer` with real TRL / PEFT / bitsandbytes / accelerate on the tiny model: losses fall, LoRA and QLoRA,
gradient accumulation, resume, several processes, capacity, and malformed datasets refused up front."""

import json
import math
import os

import datasets
import pytest
import torch
from transformers import AutoModelForImageTextToText, TrainerCallback

from testing_utils import COLORS, ROOT, solid_image
from modeling_gap import fit_latent_head_pca
from trainers import (
    GapDataCollator,
    GapDataError,
    GapSFTConfig,
    GapSFTTrainer,
    gap_lora_config,
    gap_quantization_config,
    make_synthetic_dataset,
)

METRICS = ("ce_loss", "latent_loss", "latent_norm_ratio", "latent_row_fraction")


def gap_args(tmp_path, **overrides) -> GapSFTConfig:
    options = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, seed=0, learning_rate=1e-3, per_device_train_batch_size=2, max_steps=2, disable_tqdm=True,
        lr_scheduler_type="constant", dataloader_num_workers=0,
    )
    options.update(overrides)
    return GapSFTConfig(**options)


def short_dataset(n=8, markers=None, use_latent=None) -> datasets.Dataset:
    """Short rows (so that steps are fast): one image, one question, an answer with `markers[i]` spans."""
    markers = markers or [1] * n
    answers = []
    for i, count in enumerate(markers):
        colour = ["red", "green", "blue", "yellow", "cyan", "pink"][i % 6]
        spans = " ".join(["<|latent|>"] * count)
        answers.append(f"Look {spans} it is {colour}." if count else f"It is {colour}, plainly {'so ' * (i % 3)}.")
    columns = dict(
        images=[[solid_image(COLORS[i % 6])] for i in range(n)],
        messages=[[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"},
                   {"role": "assistant", "content": answer}] for answer in answers],
        aux_images=[[solid_image(COLORS[(i + 2) % 6], size=56)] * count for i, count in enumerate(markers)],
        answer=["x"] * n,
    )
    features = {
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "aux_images": datasets.List(datasets.Image()),
        "answer": datasets.Value("string"),
    }
    if use_latent is not None:
        columns["use_latent"] = use_latent
        features["use_latent"] = datasets.Value("bool")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def fitted_tiny_gap(dataset=None, seed=0):
    """A fresh tiny GAP model with its PCA head fitted on the dataset's images (as the recipes do)."""
    from trainers.tiny import build_tiny_gap

    model, processor = build_tiny_gap(seed=seed)
    processor.tokenizer.eos_token = "<|im_end|>"
    if dataset is not None:
        images = [image for r in dataset for image in r["images"] + r["aux_images"]]
        fit_latent_head_pca(model, images, image_processor=processor.image_processor)
    return model, processor


def train_logs(trainer):
    return [log for log in trainer.state.log_history if "loss" in log]


def trainable_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny GAP checkpoint on disk (weights, remote code, processor): the base of the LoRA and QLoRA runs."""
    from trainers.tiny import build_tiny_gap

    path = tmp_path_factory.mktemp("tiny-gap")
    model, processor = build_tiny_gap(seed=0)
    processor.tokenizer.eos_token = "<|im_end|>"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# ---- 1. full fine-tune ---------------------------------------------------------------------------------------------
def test_full_fine_tune_lowers_both_losses_and_logs_the_metrics(tmp_path):
    dataset = short_dataset(8)
    model, processor = fitted_tiny_gap(dataset)
    args = gap_args(tmp_path, max_steps=30, learning_rate=2e-3)
    assert args.gradient_checkpointing  # TRL's default, kept
    trainer = GapSFTTrainer(model, args=args, train_dataset=dataset, processing_class=processor)
    assert not any(p.requires_grad for p in model.model.visual.parameters())  # freeze_vision_tower
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 30
    for log in logs:
        assert all(name in log for name in METRICS), log
        assert log["latent_row_fraction"] == 1.0
        assert math.isclose(log["loss"], log["ce_loss"] + log["latent_loss"], rel_tol=1e-4)
    first = {name: sum(log[name] for log in logs[:3]) / 3 for name in ("ce_loss", "latent_loss")}
    last = {name: sum(log[name] for log in logs[-3:]) / 3 for name in ("ce_loss", "latent_loss")}
    print("first", first, "last", last, "norm ratio", logs[-1]["latent_norm_ratio"])
    assert last["ce_loss"] < 0.7 * first["ce_loss"]
    assert last["latent_loss"] < 0.7 * first["latent_loss"]
    assert 0.3 < logs[-1]["latent_norm_ratio"] < 3


# ---- 2. LoRA -------------------------------------------------------------------------------------------------------
def test_lora_adapter_saves_reloads_and_merges(tmp_path, saved_tiny):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = AutoModelForImageTextToText.from_pretrained(saved_tiny)
    from modeling_gap import GapQwen2_5VLProcessor

    processor = GapQwen2_5VLProcessor.from_pretrained(saved_tiny)
    dataset = short_dataset(8)
    head_before = model.latent_head.proj.weight.detach().clone()
    trainer = GapSFTTrainer(
        model, args=gap_args(tmp_path, max_steps=3, learning_rate=1e-2), train_dataset=dataset,
        processing_class=processor, peft_config=gap_lora_config(r=4, lora_alpha=8),
    )
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable)
    assert not any("visual" in name for name in trainable)  # the regex keeps LoRA off the vision tower
    assert any("latent_head.modules_to_save" in name for name in trainable)
    trainer.train()
    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any("latent_head" in key and key.endswith("proj.weight") for key in saved)
    assert any("lora_A" in key for key in saved)

    batch = GapDataCollator(processor)([dataset[i] for i in range(4)])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**batch)
    assert not torch.allclose(trained.get_base_model().latent_head.modules_to_save["default"].proj.weight, head_before)

    fresh = AutoModelForImageTextToText.from_pretrained(saved_tiny)
    reloaded = PeftModel.from_pretrained(fresh, str(adapter_dir)).eval()
    with torch.no_grad():
        again = reloaded(**batch)
    assert torch.allclose(again.logits, expected.logits, atol=1e-5)
    assert torch.allclose(again.latent_predictions, expected.latent_predictions, atol=1e-5)

    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "GapQwen2_5VLForConditionalGeneration"
    merged_dir = tmp_path / "merged"
    merged.save_pretrained(str(merged_dir))
    processor.save_pretrained(str(merged_dir))
    assert "auto_map" in json.load(open(merged_dir / "config.json"))
    assert (merged_dir / "modeling_gap.py").exists()
    final = AutoModelForImageTextToText.from_pretrained(str(merged_dir), trust_remote_code=True).eval()
    with torch.no_grad():
        out = final(**batch)
    assert torch.allclose(out.logits, expected.logits, atol=1e-4)
    assert torch.allclose(out.latent_predictions, expected.latent_predictions, atol=1e-4)


# ---- 3. QLoRA ------------------------------------------------------------------------------------------------------
def test_qlora_trains_a_4bit_base_with_a_full_precision_vision_tower(tmp_path, saved_tiny):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    from modeling_gap import GapQwen2_5VLProcessor

    quantization = gap_quantization_config(load_in_4bit=True, quant_type="nf4", compute_dtype=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(saved_tiny, quantization_config=quantization)
    processor = GapQwen2_5VLProcessor.from_pretrained(saved_tiny)
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, Linear4bit)
    assert not any(isinstance(m, Linear4bit) for m in model.model.visual.modules())
    assert model.model.visual.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert not isinstance(model.latent_head.proj, Linear4bit)

    trainer = GapSFTTrainer(
        model, args=gap_args(tmp_path, max_steps=3, learning_rate=1e-2), train_dataset=short_dataset(6),
        processing_class=processor, peft_config=gap_lora_config(r=4, lora_alpha=8),
    )
    before = trainable_state(trainer.model)
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 3 and all(math.isfinite(log["loss"]) and "latent_loss" in log for log in logs)
    after = trainable_state(trainer.model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("lora_B" in name for name in changed)
    assert any("latent_head" in name for name in changed)


# ---- 4. gradient accumulation ----------------------------------------------------------------------------------------
def test_gradient_accumulation_gives_the_same_first_update(tmp_path):
    # Two rows that differ in supervised tokens and in latent spans (2 and 1): per-micro-batch means would differ.
    dataset = short_dataset(2, markers=[2, 1])
    collator_counts = []
    for i in range(2):
        _, processor = fitted_tiny_gap()
        batch = GapDataCollator(processor)([dataset[i]])
        collator_counts.append(((batch["labels"][:, 1:] != -100).sum().item(),
                                (batch["input_ids"] == processor.latent_token_ids[0]).sum().item()))
    assert collator_counts[0][0] != collator_counts[1][0] and collator_counts[0][1] != collator_counts[1][1]

    updates = []
    for batch_size, accumulation in ((2, 1), (1, 2)):
        model, processor = fitted_tiny_gap(dataset)
        start = trainable_state(model)
        args = gap_args(
            tmp_path / f"ga{accumulation}", max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
        )
        trainer = GapSFTTrainer(model, args=args, train_dataset=dataset, processing_class=processor)
        trainer.train()
        end = trainable_state(model)
        updates.append({name: end[name] - start[name] for name in end if name in start})
        updates[-1]["_loss"] = torch.tensor(train_logs(trainer)[0]["loss"])
    assert abs(updates[0]["_loss"] - updates[1]["_loss"]) < 1e-5
    largest = max(update.abs().max().item() for name, update in updates[0].items() if name != "_loss")
    assert largest > 1e-3  # a real update
    head = "latent_head.proj.weight"
    assert updates[0][head].abs().max() > 1e-4  # the latent loss contributes
    for name in updates[0]:
        assert torch.allclose(updates[0][name], updates[1][name], atol=1e-5), name


# ---- 5. resume -----------------------------------------------------------------------------------------------------
class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_matches_a_straight_run(tmp_path):
    """An interrupted-and-resumed run equals an uninterrupted one: every logged figure of every step (loss, grad
    norm, CE and latent loss), and every final weight and buffer. Attention dropout makes the run consume the RNG at
    every step, so the data order and the sampling state must both be restored, not only the weights."""
    dataset = short_dataset(12, markers=[1, 0, 2] * 4)
    options = dict(max_steps=6, lr_scheduler_type="linear", learning_rate=5e-3, data_seed=1)

    def with_dropout(model):
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.2
        return model

    def curve(trainer):
        keys = ("loss", "grad_norm", "ce_loss", "latent_loss")
        return [(log["step"], *(round(float(log[k]), 6) for k in keys if k in log)) for log in train_logs(trainer)]

    model, processor = fitted_tiny_gap(dataset)
    straight = GapSFTTrainer(with_dropout(model), args=gap_args(tmp_path / "a", **options), train_dataset=dataset,
                             processing_class=processor)
    straight.train()
    straight_state = {k: v.clone() for k, v in model.state_dict().items()}

    model, processor = fitted_tiny_gap(dataset)
    interrupted = GapSFTTrainer(
        with_dropout(model), args=gap_args(tmp_path / "b", save_strategy="steps", save_steps=3, **options),
        train_dataset=dataset, processing_class=processor, callbacks=[StopAt(3)],
    )
    interrupted.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    assert checkpoint.is_dir() and interrupted.state.global_step == 3
    assert (checkpoint / "rng_state.pth").exists()

    model, processor = fitted_tiny_gap(dataset, seed=1)  # other weights: the checkpoint must restore them all
    torch.manual_seed(1234)  # and another RNG state: the checkpoint must restore it too
    resumed = GapSFTTrainer(with_dropout(model),
                            args=gap_args(tmp_path / "b", save_strategy="steps", save_steps=3, **options),
                            train_dataset=dataset, processing_class=processor)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    assert [step for step, *_ in curve(resumed)] == list(range(1, 7))
    assert curve(resumed) == curve(straight)  # the whole curve, not only its end
    for name, value in model.state_dict().items():  # parameters and buffers (PCA statistics, ema_norm)
        assert torch.allclose(value, straight_state[name], atol=1e-6), name

    # The same interruption without the checkpoint's RNG state diverges: the test can tell.
    (checkpoint / "rng_state.pth").unlink()
    model, processor = fitted_tiny_gap(dataset, seed=1)
    torch.manual_seed(1234)
    unrestored = GapSFTTrainer(with_dropout(model),
                               args=gap_args(tmp_path / "c", save_strategy="no", **options),
                               train_dataset=dataset, processing_class=processor)
    unrestored.train(resume_from_checkpoint=str(checkpoint))
    assert curve(unrestored)[3:] != curve(straight)[3:]


# ---- 7. capacity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity_guided", [True, False])
def test_capacity_guided_rows_train_without_latent_loss(tmp_path, capacity_guided):
    dataset = short_dataset(4, use_latent=[False] * 4)  # every row marked easy for the base
    model, processor = fitted_tiny_gap(dataset)
    head = {k: v.clone() for k, v in model.latent_head.named_parameters()}
    trainer = GapSFTTrainer(
        model, args=gap_args(tmp_path, max_steps=2, learning_rate=1e-2, capacity_guided=capacity_guided),
        train_dataset=dataset, processing_class=processor,
    )
    trainer.train()
    logs = train_logs(trainer)
    changed = any(not torch.equal(v, model.latent_head.get_parameter(k)) for k, v in head.items())
    if capacity_guided:
        assert all(log["latent_row_fraction"] == 0.0 and "latent_loss" not in log for log in logs)
        assert not changed  # no latent loss: the head gets no gradient
    else:
        assert all(log["latent_row_fraction"] == 1.0 and log["latent_loss"] > 0 for log in logs)
        assert changed


# ---- closed-loop training, configuration, malformed datasets ----------------------------------------------------
def test_self_feedback_training_feeds_closed_loop_latents(tmp_path):
    dataset = short_dataset(2, markers=[2, 1])
    losses = {}
    for mode in ("teacher", "self"):
        model, processor = fitted_tiny_gap(dataset)
        calls = []
        original = model.closed_loop_latent_inputs
        model.closed_loop_latent_inputs = lambda **batch: calls.append(1) or original(**batch)
        trainer = GapSFTTrainer(model, args=gap_args(tmp_path / mode, max_steps=1, latent_feedback_training=mode),
                                train_dataset=dataset, processing_class=processor)
        trainer.train()
        losses[mode] = train_logs(trainer)[0]
        assert len(calls) == (1 if mode == "self" else 0)
    # Same targets, other inputs at the slots: the latent loss of the first step differs.
    assert losses["self"]["latent_loss"] != pytest.approx(losses["teacher"]["latent_loss"], rel=1e-4)
    assert math.isfinite(losses["self"]["loss"])


def test_trainer_settings_reach_the_model_config(tmp_path):
    dataset = short_dataset(2)
    model, processor = fitted_tiny_gap(dataset)
    GapSFTTrainer(model, args=gap_args(tmp_path, latent_loss="cos", latent_loss_weight=0.5), train_dataset=dataset,
                  processing_class=processor)
    assert model.config.latent_loss == "cos" and model.config.latent_loss_weight == 0.5
    with pytest.raises(ValueError, match="latent_loss must be one of"):
        gap_args(tmp_path, latent_loss="l1")
    with pytest.raises(ValueError, match="latent_feedback_training"):
        gap_args(tmp_path, latent_feedback_training="student")


def test_trainer_refuses_a_malformed_dataset_naming_the_row(tmp_path):
    dataset = short_dataset(5)
    rows = dataset.to_list()
    rows[3]["aux_images"] = []
    bad = datasets.Dataset.from_list(rows, features=dataset.features)
    model, processor = fitted_tiny_gap()
    with pytest.raises(GapDataError, match=r"^Row 3: 1 <\|latent\|> marker\(s\) but 0 aux image\(s\)"):
        GapSFTTrainer(model, args=gap_args(tmp_path), train_dataset=bad, processing_class=processor)


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for name in ("ddp", "fsdp", "zero3"):
        config = load_config_from_file(os.path.join(ROOT, "recipes", "accelerate_configs", f"{name}.yaml"))
        kinds[name] = config.distributed_type.value
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}


def test_synthetic_dataset_trains_through_the_trainer(tmp_path):
    dataset = make_synthetic_dataset(4, seed=0, use_latent_fraction=0.5)
    model, processor = fitted_tiny_gap(dataset)
    trainer = GapSFTTrainer(model, args=gap_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                            train_dataset=dataset, eval_dataset=make_synthetic_dataset(4, seed=1),
                            processing_class=processor)
    trainer.train()
    log = train_logs(trainer)[0]
    assert log["latent_row_fraction"] == pytest.approx(sum(dataset["use_latent"]) / 4)
    metrics = trainer.evaluate()
    assert metrics["eval_latent_row_fraction"] == 1.0  # no use_latent column: every span kept
    assert math.isclose(metrics["eval_loss"], metrics["eval_ce_loss"] + metrics["eval_latent_loss"], rel_tol=1e-4)


def test_an_error_in_the_forward_names_the_dataset_rows_of_the_batch(tmp_path):
    """Validation makes a forward error on data unexpected; should one happen (a model bug), the model's "Row <batch
    position>" is translated to the dataset rows the collator carried."""
    import re

    dataset = short_dataset(6)
    model, processor = fitted_tiny_gap(dataset)
    trainer = GapSFTTrainer(model, args=gap_args(tmp_path, max_steps=1, per_device_train_batch_size=3, data_seed=3),
                            train_dataset=dataset, processing_class=processor)

    def failing_forward(*args, **kwargs):
        assert "gap_row_indices" not in kwargs  # not a forward argument: the trainer pops it
        raise ValueError("Row 1: something the model could not take.")

    model.forward = failing_forward
    with pytest.raises(ValueError) as error:
        trainer.train()
    message = str(error.value)
    rows = [int(r) for r in re.search(r"dataset rows of this batch: \[([\d, ]+)\]", message).group(1).split(", ")]
    assert len(rows) == 3 and len(set(rows)) == 3 and set(rows) <= set(range(6))
    assert f"Batch row 1 (dataset row {rows[1]}): something the model could not take." in message
