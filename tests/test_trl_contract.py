"""`GapSFTTrainer` keeps TRL's `SFTTrainer` contract: its constructor, its losses (`loss_type`, label smoothing,
`compute_loss_func`) equal to TRL's on the same rows, PEFT prompt learning, TRL's dataset formats and label masks,
every `SFTConfig` field working or refused, and padding-free batches with the padded batch's losses and gradients."""

import contextlib
import dataclasses
import inspect
import os

import datasets
import pytest
import torch
from transformers.trainer_pt_utils import LabelSmoother
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from testing_utils import COLORS, ROOT, solid_image
from trainers import GapDataCollator, GapSFTConfig, GapSFTTrainer
from trainers.tiny import build_tiny_gap, build_tiny_qwen2_5_vl

QUESTIONS = ["Colour?", "What colour is the big square in this picture?", "Which corner is light?", "Why?"]
ANSWERS = ["Red.", "It is green, and the corner is lighter.", "The left one, at the top.", "Because it is blue."]


def config(tmp_path, cls=GapSFTConfig, **overrides):
    options = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                   per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2, logging_steps=1, seed=0,
                   disable_tqdm=True, max_length=None)
    if cls is GapSFTConfig:
        options.update(latent_loss_weight=0.5)
    options.update(overrides)
    return cls(**options)


def messages_row(i, answer=None, span=False):
    answer = answer or ANSWERS[i % 4]
    if span:
        answer = "Let me look. <|latent|> " + answer
    return {
        "images": [solid_image(COLORS[i % 6], size=56 + 28 * (i % 2))],
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % 4]}]},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        "aux_images": [solid_image(COLORS[(i + 2) % 6])] if span else [],
    }


def dataset(rows):
    return datasets.Dataset.from_list(rows)


def gap_and_stock():
    """The tiny GAP model and a stock Qwen2.5-VL with the same weights (built twice from one seed), the processor."""
    gap, processor = build_tiny_gap(seed=0)
    stock, _, _ = build_tiny_qwen2_5_vl(seed=0)
    for (name, a), (_, b) in zip(gap.named_parameters(), stock.named_parameters()):
        assert torch.equal(a, b), name
    return gap, stock, processor


def train_batch(trainer, rows):
    return trainer._prepare_inputs(trainer.data_collator(rows))


# ---- the constructor ----------------------------------------------------------------------------------------------
def test_the_constructor_takes_sft_trainers_arguments_in_its_order():
    ours = list(inspect.signature(GapSFTTrainer.__init__).parameters)
    trls = list(inspect.signature(SFTTrainer.__init__).parameters)
    assert ours == trls


# ---- losses: TRL's on the same rows, plus the latent term -----------------------------------------------------------
@pytest.mark.parametrize("loss", [dict(), dict(loss_type="dft"), dict(label_smoothing_factor=0.1)],
                         ids=["nll", "dft", "label_smoothing"])
def test_text_losses_equal_trls_on_the_same_rows(tmp_path, loss):
    gap, stock, processor = gap_and_stock()
    rows = [messages_row(i) for i in range(4)]
    common = dict(assistant_only_loss=False, **loss)
    trl_trainer = SFTTrainer(stock, args=config(tmp_path, SFTConfig, remove_unused_columns=False, **common),
                             train_dataset=dataset(rows), processing_class=processor)
    gap_trainer = GapSFTTrainer(gap, args=config(tmp_path, **common), train_dataset=dataset(rows),
                                processing_class=processor)
    trl_batch, gap_batch = train_batch(trl_trainer, rows), train_batch(gap_trainer, rows)
    # The same tokens and labels: the whole conversation, as TRL trains it with assistant_only_loss=False.
    assert torch.equal(trl_batch["input_ids"], gap_batch["input_ids"])
    assert torch.equal(trl_batch["labels"], gap_batch["labels"])
    with torch.no_grad():
        trl_loss = trl_trainer.compute_loss(stock, dict(trl_batch))
        gap_loss = gap_trainer.compute_loss(gap, dict(gap_batch))
    assert gap_loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    if loss:  # the option changes the loss: a trainer that ignored it would give the plain NLL
        nll_trainer = GapSFTTrainer(gap, args=config(tmp_path, assistant_only_loss=False),
                                    train_dataset=dataset(rows), processing_class=processor)
        with torch.no_grad():
            plain = nll_trainer.compute_loss(gap, dict(gap_batch))
        assert abs(plain.item() - gap_loss.item()) > 1e-3


@pytest.mark.parametrize("loss", [dict(), dict(loss_type="dft"), dict(label_smoothing_factor=0.1)],
                         ids=["nll", "dft", "label_smoothing"])
def test_with_a_span_the_loss_is_trls_text_loss_plus_the_weighted_latent_loss(tmp_path, loss):
    model, processor = build_tiny_gap(seed=0)
    rows = [messages_row(i, span=i % 2 == 0) for i in range(4)]
    trainer = GapSFTTrainer(model, args=config(tmp_path, **loss), train_dataset=dataset(rows),
                            processing_class=processor)
    batch = train_batch(trainer, rows)
    model.eval()
    with torch.no_grad():
        loss_value = trainer.compute_loss(model, dict(batch))
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "gap_row_indices")}
        outputs = model(**inputs, labels=batch["labels"], use_cache=False)
    labels = batch["labels"]
    if loss.get("label_smoothing_factor"):
        text = LabelSmoother(epsilon=0.1)(outputs, labels, shift_labels=True)
    else:
        log_probs = torch.log_softmax(outputs.logits[:, :-1].float(), -1)
        targets = labels[:, 1:]
        mask = targets != -100
        token_log_probs = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask]
        weights = token_log_probs.exp() if loss.get("loss_type") == "dft" else torch.ones_like(token_log_probs)
        text = -(token_log_probs * weights).sum() / mask.sum()
    assert outputs.latent_loss is not None
    assert loss_value.item() == pytest.approx((text + 0.5 * outputs.latent_loss).item(), abs=1e-5)


def test_compute_loss_func_gets_the_logits_and_the_latent_term_is_added(tmp_path):
    model, processor = build_tiny_gap(seed=0)
    rows = [messages_row(i, span=True) for i in range(2)]
    calls = []

    def double_ce(outputs, labels, num_items_in_batch=None):
        calls.append(outputs.logits.shape)
        logits, targets = outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        return 2 * torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)

    with pytest.warns(FutureWarning, match="compute_loss_func"):  # TRL's deprecation
        trainer = GapSFTTrainer(model, config(tmp_path), None, dataset(rows), None, processor, double_ce)
    batch = train_batch(trainer, rows)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        outputs = model(**{k: v for k, v in batch.items() if k != "gap_row_indices"}, use_cache=False)
    assert calls and calls[0][:2] == batch["input_ids"].shape
    assert loss.item() == pytest.approx((2 * outputs.ce_loss + 0.5 * outputs.latent_loss).item(), abs=1e-5)


def test_return_outputs_warns_as_trl_does_and_returns_the_logits(tmp_path):
    model, processor = build_tiny_gap(seed=0)
    rows = [messages_row(i, span=True) for i in range(2)]
    trainer = GapSFTTrainer(model, args=config(tmp_path), train_dataset=dataset(rows), processing_class=processor)
    batch = train_batch(trainer, rows)
    with torch.no_grad(), pytest.warns(FutureWarning, match="`return_outputs=True`.*deprecated"):
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[:2] == batch["labels"].shape and torch.isfinite(loss)


# ---- PEFT prompt learning --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_learning_trains_with_latent_spans(tmp_path, method):
    from peft import PromptEncoderConfig, PromptTuningConfig

    model, processor = build_tiny_gap(seed=0)
    peft_config = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if method == "prompt_tuning"
                   else PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32))
    rows = [messages_row(i, span=True) for i in range(4)]
    trainer = GapSFTTrainer(model, args=config(tmp_path), train_dataset=dataset(rows),
                            processing_class=processor, peft_config=peft_config)
    prompt_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen_before = model.lm_head.weight.detach().clone()
    # The scored states are the rows' own (the virtual tokens are in front): the loss equals the model's own forward
    # with the virtual tokens fed as embeddings.
    batch = train_batch(trainer, rows)
    peft_model = trainer.model
    peft_model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(peft_model, dict(batch))
        reference = trainer._forward_with_virtual_tokens(
            peft_model, **{k: v for k, v in batch.items() if k not in ("labels", "gap_row_indices")}, use_cache=False,
            labels=torch.cat([torch.full((4, 4), -100), batch["labels"]], dim=1))
    assert loss.item() == pytest.approx((reference.ce_loss + 0.5 * reference.latent_loss).item(), abs=1e-5)
    history = trainer.train().metrics and trainer.state.log_history
    assert any("latent_loss" in entry for entry in history)
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad
               and not torch.equal(p.detach(), prompt_before[n])]
    assert changed and torch.equal(model.lm_head.weight, frozen_before)


# ---- TRL's dataset formats and label masks ---------------------------------------------------------------------------
def test_assistant_only_loss_false_gives_trls_labels_and_the_default_the_assistant_turns(tiny_gap):
    _, processor = tiny_gap
    rows = [messages_row(i) for i in range(3)]
    trl = DataCollatorForVisionLanguageModeling(processor)([{**r, "images": list(r["images"])} for r in rows])
    whole = GapDataCollator(processor, assistant_only_loss=False)(rows)
    assert torch.equal(trl["labels"], whole["labels"])
    default = GapDataCollator(processor)(rows)
    text = processor.tokenizer.decode(default["labels"][1][default["labels"][1] != -100])
    assert text == ANSWERS[1] + "<|im_end|>"


def prompt_completion_row(i, span=True):
    row = messages_row(i, span=span)
    return {"images": row["images"], "prompt": row["messages"][:1], "completion": row["messages"][1:],
            "aux_images": row["aux_images"]}


def test_prompt_completion_rows_train_on_the_completion_with_its_span(tmp_path):
    model, processor = build_tiny_gap(seed=0)
    rows = [prompt_completion_row(i, span=i != 3) for i in range(4)]
    trainer = GapSFTTrainer(model, args=config(tmp_path), train_dataset=dataset(rows), processing_class=processor)
    batch = trainer.data_collator(rows)
    # TRL's completion-only mask: everything after the prompt rendered with its generation prompt.
    labels = batch["labels"][0]
    assert processor.tokenizer.decode(labels[labels != -100]) == (
        "Let me look. <|latent_start|><|latent_end|> " + ANSWERS[0] + "<|im_end|>\n")
    assert (batch["input_ids"] == processor.latent_token_ids[0]).sum() == 3 * processor.num_latent_tokens
    prompt_too = GapDataCollator(processor, completion_only_loss=False)(rows)
    assert (prompt_too["labels"] != -100).sum() > (batch["labels"] != -100).sum()
    trainer.train()
    assert any("latent_loss" in entry for entry in trainer.state.log_history)


def test_plain_text_rows_train_as_text_sft(tmp_path):
    model, processor = build_tiny_gap(seed=0)
    rows = [{"text": f"The square number {i} is {ANSWERS[i]}"} for i in range(4)]
    trainer = GapSFTTrainer(model, args=config(tmp_path), train_dataset=dataset(rows), processing_class=processor)
    batch = trainer.data_collator(rows)
    labels = batch["labels"][0]
    assert processor.tokenizer.decode(labels[labels != -100]) == rows[0]["text"] + "<|im_end|>"  # TRL adds EOS
    trainer.train()
    assert trainer.state.log_history[0]["latent_row_fraction"] == 0


@pytest.mark.parametrize("case", ["pre_tokenized", "assistant_only_text", "completion_only_messages",
                                  "marker_in_prompt"])
def test_rows_a_setting_cannot_train_are_refused_naming_the_row(tiny_gap, case):
    _, processor = tiny_gap
    row, options = {
        "pre_tokenized": ({"input_ids": [1, 2, 3]}, {}),
        "assistant_only_text": ({"text": "plain"}, dict(assistant_only_loss=True)),
        "completion_only_messages": (messages_row(0), dict(completion_only_loss=True)),
        "marker_in_prompt": (
            {"prompt": "Look <|latent|>", "completion": " red", "aux_images": [solid_image(COLORS[0])]}, {}),
    }[case]
    with pytest.raises(ValueError, match=r"^Row 0: ") as error:
        GapDataCollator(processor, **options)([row])
    assert "\n" not in str(error.value)


def test_formatting_func_turns_rows_into_text(tmp_path):
    model, processor = build_tiny_gap(seed=0)
    rows = [{"question": QUESTIONS[i], "answer": ANSWERS[i]} for i in range(4)]
    trainer = GapSFTTrainer(model, args=config(tmp_path), train_dataset=dataset(rows), processing_class=processor,
                            formatting_func=lambda row: f"Q: {row['question']} A: {row['answer']}")
    labels = trainer.data_collator(rows)["labels"][1]
    assert processor.tokenizer.decode(labels[labels != -100]) == f"Q: {QUESTIONS[1]} A: {ANSWERS[1]}<|im_end|>"
    trainer.train()


# ---- every SFTConfig field works or is refused ----------------------------------------------------------------------
REFUSED = {
    "packing_strategy": dict(packing=True, max_length=512, packing_strategy="wrapped"),
    "packing without max_length": dict(eval_packing=True),
    "truncation_mode": dict(truncation_mode="keep_end"),
    "dataset_num_proc": dict(dataset_num_proc=2),
    "padding_free with pad_to_multiple_of": dict(padding_free=True, pad_to_multiple_of=8),
}


@pytest.mark.parametrize("fields", list(REFUSED.values()), ids=list(REFUSED))
def test_fields_gap_cannot_honour_are_refused_in_one_line(tmp_path, fields):
    with pytest.raises(ValueError) as error:
        with pytest.warns(FutureWarning) if fields.get("truncation_mode") else contextlib.nullcontext():  # TRL's
            config(tmp_path, **fields)
    assert "\n" not in str(error.value) and len(str(error.value)) < 300


def test_trainer_level_refusals_are_one_line(tmp_path):
    from peft import CPTConfig, PromptTuningConfig

    model, processor = build_tiny_gap(seed=0)
    rows = dataset([messages_row(i) for i in range(2)])
    cases = [
        dict(args=config(tmp_path, loss_type="dft", label_smoothing_factor=0.1)),
        dict(args=config(tmp_path, padding_free=True), data_collator=GapDataCollator(processor)),
        dict(args=config(tmp_path, completion_only_loss=True), formatting_func=lambda row: "text"),
        dict(args=config(tmp_path, padding_free=True),
             peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)),
        dict(args=config(tmp_path), peft_config=CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[1, 2, 3])),
    ]
    for case in cases:
        with pytest.raises(ValueError) as error:
            GapSFTTrainer(build_tiny_gap(seed=0)[0], train_dataset=rows, processing_class=processor, **case)
        assert "\n" not in str(error.value), error.value


def test_every_sft_config_field_is_in_the_readme_table():
    """The README's "Fine-tune" table names every field of TRL's SFTConfig (not TrainingArguments') and the
    constructor arguments, with what GAP does with each."""
    from transformers import TrainingArguments

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme.split("### TRL's options in GAP", 1)[1].split("\n## ", 1)[0]
    own = {f.name for f in dataclasses.fields(SFTConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    own |= {"label_smoothing_factor", "compute_loss_func", "formatting_func", "peft_config"}
    missing = sorted(name for name in own if f"`{name}`" not in table)
    assert not missing, missing


# ---- padding-free --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_loss_and_gradients_equal_the_padded_batch(tmp_path, attention):
    """eager: one block-diagonal causal mask over the concatenated rows (transformers' packed mask); sdpa: the
    trainer runs it row by row (`gap_varlen_sdpa`, the cost of variable-length kernels)."""
    model, processor = build_tiny_gap(seed=0)
    model.config._attn_implementation = attention
    two_turns = messages_row(3, span=True)
    two_turns["messages"] = two_turns["messages"] * 2  # user, assistant, user, assistant: two spans
    two_turns["images"], two_turns["aux_images"] = two_turns["images"] * 2, two_turns["aux_images"] * 2
    rows = [messages_row(0, span=True), messages_row(1, "A much longer answer " * 3, span=True), messages_row(2),
            two_turns]
    results = {}
    for padding_free in (False, True):
        trainer = GapSFTTrainer(model, args=config(tmp_path, padding_free=padding_free), train_dataset=dataset(rows),
                                processing_class=processor)
        batch = train_batch(trainer, rows)
        assert ("attention_mask" in batch) != padding_free and batch["input_ids"].shape[0] == (1 if padding_free else 4)
        model.eval()  # no EMA update between the two passes; the loss and gradients are the training ones
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[padding_free] = loss.detach(), grads, trainer._metrics["eval"]["latent_loss"][-1]
    (padded, padded_grads, padded_latent), (flat, flat_grads, flat_latent) = results[False], results[True]
    assert flat.item() == pytest.approx(padded.item(), abs=1e-5)
    assert flat_latent == pytest.approx(padded_latent, abs=1e-5)
    assert padded_grads.keys() == flat_grads.keys() and "latent_head.proj.weight" in padded_grads
    for name in padded_grads:
        torch.testing.assert_close(flat_grads[name], padded_grads[name], atol=1e-5, rtol=0, msg=name)


def test_padding_free_trains_and_is_refused_for_an_attention_that_cannot(tmp_path):
    model, processor = build_tiny_gap(seed=0)
    rows = [messages_row(i, span=i % 2 == 0) for i in range(4)]
    trainer = GapSFTTrainer(model, args=config(tmp_path, padding_free=True), train_dataset=dataset(rows),
                            processing_class=processor)
    trainer.train()
    assert trainer.state.log_history[0]["latent_row_fraction"] == 0.5
    assert model.config.text_config._attn_implementation == "gap_varlen_sdpa"  # sdpa, row by row
    model.config.text_config._attn_implementation_internal = "paged|sdpa"
    with pytest.raises(ValueError, match="Padding-free batches need an attention implementation") as error:
        trainer.compute_loss(model, train_batch(trainer, rows))
    assert "\n" not in str(error.value)


def test_packing_packs_whole_rows_into_max_length_and_trains(tmp_path):
    model, processor = build_tiny_gap(seed=0)
    rows = [messages_row(i, "word " * (4 * i) + ANSWERS[i % 4], span=True) for i in range(6)]
    max_length = 300
    trainer = GapSFTTrainer(model, args=config(tmp_path, packing=True, max_length=max_length,
                                               per_device_train_batch_size=1), train_dataset=dataset(rows),
                            processing_class=processor)
    packs = trainer.train_dataset
    assert len(packs) < len(rows)
    seen = []
    for i in range(len(packs)):
        batch = trainer.data_collator([packs[i]])
        assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= max_length
        seen += batch["gap_row_indices"].tolist()
    assert sorted(seen) == list(range(6))  # every row once, none split
    trainer.train()
    assert "latent_loss" in trainer.state.log_history[0]
