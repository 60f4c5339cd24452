"""Latent-aware `generate`: stock parity without spans, exact spans, batch invariance, interventions, sampling,
streaming, bounds, PEFT and bf16."""

import pytest
import torch
from transformers import TextStreamer

from testing_utils import force_span, question_batch
from trainers.tiny import build_tiny_qwen2_5_vl

def test_without_spans_greedy_equals_stock_generate(tiny_gap):
    model, processor = tiny_gap
    stock = build_tiny_qwen2_5_vl(seed=0)[0]  # the weights the tiny GAP model was converted from
    batch = question_batch(processor)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) == 4  # four different prompt lengths, left padded
    ban = [model.config.latent_start_token_id]
    with torch.no_grad():
        ours = model.generate(**batch, max_new_tokens=16, do_sample=False, suppress_tokens=ban)
        theirs = stock.generate(**batch, max_new_tokens=16, do_sample=False, suppress_tokens=ban)
    assert ours.shape[1] > batch["input_ids"].shape[1]
    assert torch.equal(ours, theirs)


def test_forced_span_has_k_slots_and_matches_a_full_forward(tiny_gap):
    model, processor = tiny_gap
    pad, start, end = model.config.latent_token_ids
    k = model.config.num_latent_tokens
    batch = question_batch(processor, rows=[0, 1])
    prompt = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=k + 8, do_sample=False, logits_processor=force_span(model, batch, {0: 2, 1: 2}),
            max_latent_spans=1, output_logits=True, return_latents=True,
        )
    new = out.sequences[:, prompt:]
    for row in range(2):
        assert new[row, 2] == start
        assert new[row, 3 : 3 + k].tolist() == [pad] * k
        assert new[row, 3 + k] == end
        assert out.latents[row].shape == (1, k, model.config.text_config.hidden_size)
    # The same sequence through one no-cache forward, the fed latents at the slots, gives the same logits.
    length = out.sequences.shape[1] - 1  # the last token was never fed
    full_mask = torch.cat([batch["attention_mask"], torch.ones(2, length - prompt, dtype=torch.long)], dim=1)
    mm = torch.cat([batch["mm_token_type_ids"], torch.zeros(2, length - prompt, dtype=torch.long)], dim=1)
    with torch.no_grad():
        reference = model(
            input_ids=out.sequences[:, :length], attention_mask=full_mask, mm_token_type_ids=mm,
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            latent_targets=torch.cat(out.latents),
        ).logits
    generated = torch.stack(out.logits, dim=1)  # (B, new, V): logits that chose token t
    for t in range(generated.shape[1]):
        difference = (generated[:, t] - reference[:, prompt - 1 + t]).abs().max().item()
        assert difference < 1e-4, (t, difference)


def test_batch_invariance_with_spans_at_different_steps(tiny_gap):
    model, processor = tiny_gap
    steps = {0: 1, 1: 4, 2: 6}  # row 3 never opens a span
    batch = question_batch(processor)
    kwargs = dict(max_new_tokens=18, do_sample=False, max_latent_spans=1, return_latents=True)
    with torch.no_grad():
        together = model.generate(**batch, logits_processor=force_span(model, batch, steps), **kwargs)
    prompt = batch["input_ids"].shape[1]
    for row in range(4):
        alone_batch = question_batch(processor, rows=[row])
        force = force_span(model, alone_batch, {0: steps[row]} if row in steps else {})
        with torch.no_grad():
            alone = model.generate(**alone_batch, logits_processor=force, **kwargs)
        alone_new = alone.sequences[0, alone_batch["input_ids"].shape[1] :]
        assert together.sequences[row, prompt:].tolist() == alone_new.tolist(), row
        assert together.latents[row].shape == alone.latents[0].shape
        if row in steps:
            assert together.latents[row].shape[0] == 1
            assert (together.latents[row] - alone.latents[0]).abs().max() < 1e-4


def OPEN_AT_ONCE(model):
    return {(model.config.latent_start_token_id,): 100.0}


@pytest.fixture(scope="module")
def probe_runs(tiny_gap):
    model, processor = tiny_gap
    batch = question_batch(processor, rows=[1])
    results = {}
    for intervention in [None, "zero", "noise", "shuffle", "mean", "drop"]:
        with torch.no_grad():
            results[intervention] = model.generate(
                **batch, max_new_tokens=14, do_sample=False, sequence_bias=OPEN_AT_ONCE(model),
                latent_intervention=intervention, latent_intervention_seed=7, max_latent_spans=1, return_latents=True,
            )
    return model, batch, results


def test_interventions_change_what_is_fed(probe_runs):
    model, batch, runs = probe_runs
    base = runs[None].latents[0][0]  # (K, d); its first latent comes from the same context in every run
    assert base.abs().sum() > 0
    assert torch.equal(runs["zero"].latents[0], torch.zeros_like(runs["zero"].latents[0]))
    noise = runs["noise"].latents[0][0]
    assert torch.allclose(noise[0].norm(), base[0].norm(), rtol=1e-5)
    assert torch.nn.functional.cosine_similarity(noise[0], base[0], dim=0).abs() < 0.5
    shuffled = runs["shuffle"].latents[0][0]
    assert torch.equal(shuffled[0].sort().values, base[0].sort().values) and not torch.equal(shuffled[0], base[0])
    mean = runs["mean"].latents[0][0]
    assert torch.equal(mean, model.latent_head.pca_mean.expand_as(mean))
    assert runs["drop"].latents[0].shape[0] == 0


def test_drop_equals_a_run_where_the_span_never_opened(probe_runs):
    model, batch, runs = probe_runs
    with torch.no_grad():
        never = model.generate(**batch, max_new_tokens=14, do_sample=False, sequence_bias=OPEN_AT_ONCE(model),
                               suppress_tokens=[model.config.latent_start_token_id])
    assert torch.equal(runs["drop"].sequences, never)
    assert model.config.latent_start_token_id not in runs["drop"].sequences.tolist()[0]
    assert not torch.equal(runs["drop"].sequences, runs[None].sequences)


def test_noise_is_seedable(tiny_gap, probe_runs):
    model, batch, runs = probe_runs
    with torch.no_grad():
        again = model.generate(
            **batch, max_new_tokens=14, do_sample=False, sequence_bias=OPEN_AT_ONCE(model),
            latent_intervention="noise", latent_intervention_seed=7, max_latent_spans=1, return_latents=True,
        )
    assert torch.equal(again.latents[0], runs["noise"].latents[0])


def test_sampling_is_reproducible_and_streamer_gets_the_text(tiny_gap):
    model, processor = tiny_gap
    batch = question_batch(processor, rows=[2])
    force = force_span(model, batch, {0: 1})

    def sample():
        torch.manual_seed(1234)
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=20, do_sample=True, temperature=1.3, top_k=50, top_p=0.95,
                                  logits_processor=force)

    first, second = sample(), sample()
    assert torch.equal(first, second)
    assert model.config.latent_start_token_id in first[0].tolist()

    class Collect(TextStreamer):
        text = ""

        def on_finalized_text(self, text, stream_end=False):
            self.text += text

    streamer = Collect(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        torch.manual_seed(1234)
        streamed = model.generate(**batch, max_new_tokens=20, do_sample=True, temperature=1.3, top_k=50, top_p=0.95,
                                  logits_processor=force, streamer=streamer)
    assert torch.equal(streamed, first)
    expected = processor.tokenizer.decode(first[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert streamer.text == expected


@pytest.mark.parametrize("do_sample", [False, True])
def test_no_setting_loops_in_latent_mode(tiny_gap, do_sample):
    model, processor = tiny_gap
    pad, start, end = model.config.latent_token_ids
    k = model.config.num_latent_tokens
    batch = question_batch(processor, rows=[0, 3])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=23, do_sample=do_sample, sequence_bias={(start,): 100.0})
    new = out[:, batch["input_ids"].shape[1] :]
    assert new.shape[1] <= 23
    for row in new.tolist():
        assert row.count(start) >= 3
        for i, token in enumerate(row):
            if token == start:  # every span is exactly K slots then the end token (unless cut by the length limit)
                span = row[i + 1 : i + 2 + k]
                assert span[:k] == [pad] * len(span[:k])
                assert len(span) <= k or span[k] == end
        runs = "".join("p" if t == pad else "." for t in row).split(".")
        assert max(len(r) for r in runs) <= k


def test_generate_on_peft_model_and_in_bf16(fresh_tiny_gap):
    from peft import LoraConfig, get_peft_model

    model, processor = fresh_tiny_gap
    batch = question_batch(processor, rows=[0])
    force = force_span(model, batch, {0: 0})
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=10, do_sample=False, logits_processor=force)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", modules_to_save=["latent_head"])
    )
    with torch.no_grad():
        wrapped = peft_model.generate(**batch, max_new_tokens=10, do_sample=False, logits_processor=force)
    assert torch.equal(wrapped, plain)  # LoRA starts as the identity
    bf16 = peft_model.merge_and_unload().to(torch.bfloat16)
    bf16_batch = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        out = bf16.generate(**bf16_batch, max_new_tokens=10, do_sample=False, logits_processor=force, return_latents=True)
    assert out.latents[0].dtype == torch.bfloat16 and out.latents[0].shape[0] == 1
