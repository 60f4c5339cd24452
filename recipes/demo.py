"""The offline end-to-end GAP demo behind `make demo`: synthetic task -> six trained variants -> evaluation, probing,
norm diagnosis, latent lens, and a results table. CPU only, no download, a few minutes on 2 cores.

    python recipes/demo.py [--output_dir outputs/demo] [--steps 200] [--train_rows 768] [--test_rows 128]

The task (`trainers.synthetic`, `distractors=False`): a 112x112 board of 2x2 cells; one cell, framed in white, holds
a small coloured square; "What colour is the square in the white frame?" (4 colours: chance 0.25). The aux image of
the latent span is the crop of that cell. The assistant text states the intent before the span ("Cell r,c.") and
the parser description after it ("Answer: red").

Variants, all the same tiny random Qwen2.5-VL (text width 64, 2 layers, K = 4 latents, frozen vision tower), the same
steps, batch and seed, trained with `GapSFTTrainer`:
- oracle: the aux image given as a second input image, text only (the ceiling a perfect latent could reach);
- text SFT: the same text without the span;
- raw / ema_norm / pca: latent spans where the text-SFT model struggles (capacity: its sampled pass rate on the
  training row <= 0.5; other rows train as text), fed back as Monet does (raw), rescaled (ema_norm), or through the
  PCA-aligned head (pca, the PCA fitted on the training images first);
- pca, no capacity: every row keeps its span.
Each latent variant is scored three ways: closed loop (its own latents fed back: the real number), teacher-forced
(the gold intent text and the aux image's true targets given, the model generates the rest: what perfect latents
would give this trained model), and, for pca, under each probing intervention. Only generated answers are scored.
Writes `results.md`, `results.json`, `norms.png`, `lens_*.png` to the output directory.
"""

import argparse
import json
import os
import tempfile
import time

import torch


LATENT_VARIANTS = [("raw", "raw", True), ("ema_norm", "ema_norm", True), ("pca", "pca", True),
                   ("pca, no capacity", "pca", False)]


def task_rows(num_rows, seed):
    from trainers.synthetic import make_synthetic_rows

    rows = make_synthetic_rows(num_rows, seed=seed, image_size=112, grid=2, num_colors=4, aux_size=56,
                               distractors=False)
    return [shorten(row) for row in rows]


def shorten(row):
    """The assistant text cut to "Cell r,c. <|latent|> Answer: red": the same intent, span and parser description
    in fewer (byte-level) tokens, which keeps the demo within its time."""
    intent, _ = row["messages"][1]["content"][0]["text"].split("<|latent|>")
    cell = ",".join(part.split()[-1].strip(".") for part in intent.split(","))
    row = dict(row)
    row["messages"] = [row["messages"][0], {"role": "assistant", "content": [
        {"type": "text", "text": f"Cell {cell}. <|latent|> Answer: {row['answer']}"}]}]
    return row


def intent_and_rest(row):
    """("Cell r,c.", "Answer: red") of a row's assistant text."""
    intent, rest = row["messages"][1]["content"][0]["text"].split("<|latent|>")
    return intent.strip(), rest.strip()


def variant_rows(rows, kind, use_latent=None):
    """Rows for one variant: `oracle` (aux image as a second input image, no span), `text` (no span), or `latent`
    (spans kept where `use_latent[i]`)."""
    from trainers.schema import remove_latent_markers

    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if kind == "oracle":
            text = remove_latent_markers(row["messages"][1]["content"][0]["text"])
            row["images"] = row["images"] + row["aux_images"]
            row["messages"] = [
                {"role": "user", "content": [{"type": "image", "text": None}] * 2 + row["messages"][0]["content"][1:]},
                {"role": "assistant", "content": [{"type": "text", "text": text}]},
            ]
            row["aux_images"], row["use_latent"] = [], False
        else:
            row["use_latent"] = kind == "latent" and (use_latent is None or bool(use_latent[i]))
        out.append(row)
    return out


def to_dataset(rows):
    import datasets

    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
            {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
        "aux_images": datasets.List(datasets.Image()),
        "answer": datasets.Value("string"),
        "use_latent": datasets.Value("bool"),
    })
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def train_variant(rows, feedback, capacity_guided, args, workdir):
    from modeling_gap import fit_latent_head_pca
    from trainers.tiny import build_tiny_gap
    from trainers import GapSFTConfig, GapSFTTrainer

    model, processor = build_tiny_gap(seed=0, latent_feedback=feedback, num_latent_tokens=4)
    calibration = [image for row in rows[:256] for image in row["images"] + row["aux_images"]]
    fit_latent_head_pca(model, calibration, image_processor=processor.image_processor)
    config = GapSFTConfig(
        output_dir=workdir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0,
        logging_steps=max(args.steps // 4, 1), save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        gradient_checkpointing=False, seed=args.seed, capacity_guided=capacity_guided, validate_dataset=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = GapSFTTrainer(model, config, train_dataset=to_dataset(rows), processing_class=processor)
    trainer.train()
    metrics = {k: v for k, v in trainer.state.log_history[-2].items() if isinstance(v, (int, float))}
    return model.eval(), processor, metrics


def eval_rows(rows, oracle=False):
    from trainers.evaluation import EvalRow

    return [EvalRow(images=r["images"] + (r["aux_images"] if oracle else []), question=r["question"],
                    answer=r["answer"], choices=None, kind="text") for r in rows]


@torch.no_grad()
def teacher_forced_accuracy(model, processor, rows, max_new_tokens, batch_size=64):
    """The gold intent and the span (true targets from the aux image) in the prompt; the model writes the rest."""
    from trainers.evaluation import build_prompt, extract_answer

    processor.tokenizer.padding_side = "left"
    correct = 0
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        prompts = [build_prompt(processor, e) + intent_and_rest(r)[0] + " <|latent|>"
                   for e, r in zip(eval_rows(chunk), chunk)]
        inputs = processor(images=[r["images"][0] for r in chunk], text=prompts,
                           aux_images=[r["aux_images"] for r in chunk], padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, max_latent_spans=0)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(extract_answer(t, "text") == r["answer"] for t, r in zip(texts, chunk))
    return correct / len(rows)


@torch.no_grad()
def latent_norm_ratio(model, processor, rows):
    """Mean norm of the closed-loop latents / mean norm of the visual input embeddings, on `rows`."""
    from trainers.evaluation import build_prompt

    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[r["images"][0] for r in rows], text=[build_prompt(processor, e) for e in eval_rows(rows)],
                       padding=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=60, do_sample=False, return_latents=True)
    latents = torch.cat([x.flatten(0, 1) for x in out.latents])
    visual = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    if latents.numel() == 0:
        return float("nan")
    return (latents.norm(dim=-1).mean() / visual.norm(dim=-1).mean()).item()


def capacity_from(model, processor, rows, args):
    """use_latent per training row: the text-SFT model's sampled pass rate <= 0.5 (2 samples)."""
    from trainers.evaluation import generate_answers

    rates = [0.0] * len(rows)
    for sample in range(2):
        torch.manual_seed(args.seed + sample)
        records = generate_answers(model, processor, eval_rows(rows), batch_size=64, progress=False,
                                   max_new_tokens=args.max_new_tokens, do_sample=True, latent_intervention="drop")
        rates = [r + rec["correct"] / 2 for r, rec in zip(rates, records)]
    return [rate <= 0.5 for rate in rates], rates


def accuracy(model, processor, rows, args, oracle=False, **generate_kwargs):
    from trainers.evaluation import generate_answers

    records = generate_answers(model, processor, eval_rows(rows, oracle), batch_size=64, progress=False,
                               max_new_tokens=args.max_new_tokens, **generate_kwargs)
    return sum(r["correct"] for r in records) / len(records)


def diagnose_and_draw(model, processor, rows, output_dir):
    """`recipes/diagnose_norms.py` on the test images (norms.png) and `recipes/latent_lens.py` on three rows."""
    from trainers.diagnostics import diagnose, draw_lens, latent_similarity_maps, plot_norms

    diagnosis = diagnose(model, processor, eval_rows(rows[:32]))
    plot_norms(diagnosis, os.path.join(output_dir, "norms.png"), title="tiny GAP (pca variant)")
    for i, row in enumerate(eval_rows(rows[:3])):
        maps, text = latent_similarity_maps(model, processor, row, max_new_tokens=60)
        draw_lens(row.images[0].convert("RGB"), maps, os.path.join(output_dir, f"lens_{i}.png"), title=text[:60])
    return diagnosis


def to_markdown(table, chance, args, seconds):
    lines = [
        f"Synthetic framed-square task, {args.train_rows} training rows, {args.test_rows} test rows, chance "
        f"{chance:.2f}; tiny Qwen2.5-VL (width 64, 2 layers, K = 4), {args.steps} steps of batch {args.batch_size}; "
        f"measured on this machine's CPU in {seconds:.0f} s.",
        "",
        "| variant | rows with a span | closed loop | teacher-forced | latent / visual-embedding norm |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {row['variant']} | {row['rows_with_span']} | {fmt(row['closed_loop'])} | "
                     f"{fmt(row['teacher_forced'])} | {fmt(row['norm_ratio'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--train_rows", type=int, default=512)
    parser.add_argument("--test_rows", type=int, default=96)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    train, test = task_rows(args.train_rows, seed=args.seed), task_rows(args.test_rows, seed=args.seed + 10_000)
    chance = 1 / 4
    table = []
    work = tempfile.mkdtemp(prefix="gap-demo-")

    def log(message):
        print(f"[{time.perf_counter() - start:5.0f} s] {message}", flush=True)

    model, processor, _ = train_variant(variant_rows(train, "oracle"), "pca", True, args, work)
    table.append(dict(variant="oracle (aux image as 2nd input)", rows_with_span=0, norm_ratio=None,
                      closed_loop=accuracy(model, processor, test, args, oracle=True), teacher_forced=None))
    log(f"oracle: {table[-1]['closed_loop']:.3f}")

    text_model, processor, _ = train_variant(variant_rows(train, "text"), "pca", True, args, work)
    table.append(dict(variant="text SFT", rows_with_span=0, norm_ratio=None, teacher_forced=None,
                      closed_loop=accuracy(text_model, processor, test, args, latent_intervention="drop")))
    log(f"text SFT: {table[-1]['closed_loop']:.3f}")
    use_latent, rates = capacity_from(text_model, processor, train, args)
    log(f"capacity: {sum(use_latent)} of {len(train)} training rows keep their span (text-SFT pass rate <= 0.5)")

    probe, pca_model = None, None
    for name, feedback, capacity in LATENT_VARIANTS:
        rows = variant_rows(train, "latent", use_latent if capacity else None)
        model, processor, metrics = train_variant(rows, feedback, True, args, work)
        entry = dict(variant=name, rows_with_span=sum(r["use_latent"] for r in rows),
                     closed_loop=accuracy(model, processor, test, args),
                     teacher_forced=teacher_forced_accuracy(model, processor, test, args.max_new_tokens),
                     norm_ratio=latent_norm_ratio(model, processor, test[:32]),
                     final_ce_loss=metrics.get("ce_loss"), final_latent_loss=metrics.get("latent_loss"))
        table.append(entry)
        log(f"{name}: closed loop {entry['closed_loop']:.3f}, teacher-forced {entry['teacher_forced']:.3f}, "
            f"norm ratio {entry['norm_ratio']:.2f}")
        if name == "pca":
            pca_model = model
            base = entry["closed_loop"]
            probe = [dict(intervention="none", accuracy=base, delta=0.0)]
            for intervention in ["zero", "noise", "shuffle", "mean", "drop"]:
                acc = accuracy(model, processor, test, args, latent_intervention=intervention,
                               latent_intervention_seed=args.seed)
                probe.append(dict(intervention=intervention, accuracy=acc, delta=acc - base))
            log("pca probe: " + ", ".join(f"{p['intervention']} {p['accuracy']:.3f}" for p in probe))

    # The paper's norm diagnosis and the latent lens, on the pca variant.
    diagnosis = diagnose_and_draw(pca_model, processor, test, args.output_dir)
    seconds = time.perf_counter() - start
    markdown = to_markdown(table, chance, args, seconds)
    markdown += "\nProbing the pca variant (closed loop; change against none):\n\n| intervention | accuracy | change |\n|---|---|---|\n"
    markdown += "".join(f"| {p['intervention']} | {p['accuracy']:.3f} | {p['delta']:+.3f} |\n" for p in probe)
    markdown += (f"\nNorm diagnosis (pca variant, test images): final text states {diagnosis['final_text_ratio']:.1f}x "
                 f"their input embeddings, image states {diagnosis['final_image_ratio']:.1f}x; fed back / visual "
                 "embedding norm: " + ", ".join(f"{k} {v:.2f}" for k, v in diagnosis["feedback_ratio"].items()) + "\n")
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(dict(chance=chance, variants=table, probe=probe, diagnosis=diagnosis, seconds=seconds,
                       capacity_rows_with_span=sum(use_latent), arguments=vars(args)), f, indent=1)
    print("\n" + markdown)
    print(f"written to {args.output_dir}: results.md, results.json, norms.png, lens_*.png")
    return table


if __name__ == "__main__":
    main()
