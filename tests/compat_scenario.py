"""What a user does with a published GAP checkpoint, as one script that needs only torch, transformers and pillow.

`python compat_scenario.py CHECKPOINT OUTPUT` loads the checkpoint through the Auto classes with
`trust_remote_code=True` (eager and sdpa attention) and saves to OUTPUT (`torch.save`) a teacher-forced forward's
logits and losses, and two greedy `generate` calls (dynamic and static cache) with an image, a latent span forced
open and `return_latents`.
`test_transformers_compat.py` runs it under several releases of transformers and compares the files; the same
`run_scenario` gives the reference in the test's own process. It imports nothing from this repository.
"""

import importlib.util
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList


def image(color, size=56):
    picture = Image.new("RGB", (size, size), color)
    picture.paste(tuple(min(c + 90, 255) for c in color), (0, 0, size // 4, size // 4))
    return picture


def prompt(processor, question, answer=None):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)


class OpenSpanAt(LogitsProcessor):
    """Forces `token` at generation step `steps[row]` of each row (counted from the prompt's end)."""

    def __init__(self, token, steps, prompt_length):
        self.token, self.steps, self.prompt_length = token, steps, prompt_length

    def __call__(self, input_ids, scores):
        for row, step in enumerate(self.steps):
            if input_ids.shape[1] - self.prompt_length == step:
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, self.token] = 0
        return scores


def run_scenario(model, processor) -> dict:
    """Forward (logits, losses, latent predictions) and greedy generate (dynamic and static cache, a span forced
    open in each row, latents returned) of `model` on a fixed two-row batch: the tensors to compare. One thread
    (the thread count changes the order of float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _scenario(model, processor)
    finally:
        torch.set_num_threads(threads)


def _scenario(model, processor) -> dict:
    red, green, blue = (200, 30, 30), (30, 200, 30), (30, 30, 200)
    processor.tokenizer.padding_side = "left"
    train = processor(
        images=[image(red), image(green)],
        text=[prompt(processor, "What colour?", "Look <|latent|> it is red."), prompt(processor, "Which corner?", "Left.")],
        aux_images=[[image(blue, size=84)], []], padding=True, return_tensors="pt",
    )
    labels = train["input_ids"].masked_fill(train["attention_mask"] == 0, -100)
    out = model(**train, labels=labels)
    results = {
        "train_input_ids": train["input_ids"], "logits": out.logits, "loss": out.loss, "ce_loss": out.ce_loss,
        "latent_loss": out.latent_loss, "latent_predictions": out.latent_predictions,
    }
    questions = processor(
        images=[image(red), image(blue)], text=[prompt(processor, "What colour?"), prompt(processor, "Why?")],
        padding=True, return_tensors="pt",
    )
    open_span = OpenSpanAt(model.config.latent_start_token_id, (1, 3), questions["input_ids"].shape[1])
    for cache in ("dynamic", "static"):
        generated = model.generate(
            **questions, max_new_tokens=16, do_sample=False, logits_processor=LogitsProcessorList([open_span]),
            return_latents=True, output_logits=True, **({"cache_implementation": "static"} if cache == "static" else {}),
        )
        results[f"{cache}_sequences"] = generated.sequences
        results[f"{cache}_logits"] = torch.stack(generated.logits, dim=1)
        results[f"{cache}_latents"] = torch.stack(generated.latents)
    return results


def main(checkpoint: str, output: str):
    """Both attention implementations of the checkpoint loaded as a user loads it; saves `{"eager": ..., "sdpa": ...,
    "environment": ...}` to `output`."""
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    results = {}
    for attention in ("eager", "sdpa"):
        model = AutoModelForImageTextToText.from_pretrained(
            checkpoint, trust_remote_code=True, attn_implementation=attention
        ).eval()
        results[attention] = run_scenario(model, processor)

    results["environment"] = {
        "transformers": transformers.__version__,
        "model_module": type(model).__module__,
        "processor_module": type(processor).__module__,
        "importable": sorted(m for m in ("modeling_gap", "trainers", "trl", "peft", "datasets", "accelerate")
                             if importlib.util.find_spec(m) is not None),
    }
    torch.save(results, output)


if __name__ == "__main__":
    main(*sys.argv[1:3])
