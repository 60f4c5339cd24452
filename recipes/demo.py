"""The offline end-to-end run behind `make demo`.

Builds a tiny random GAP model, saves it with its remote code, reloads it through
`AutoModelForImageTextToText(..., trust_remote_code=True)` and runs one teacher-forced forward with a latent span
whose targets come from an aux image, then reports the losses and the latent-norm ratios of the three feedback
modes. Nothing is downloaded.
"""

import argparse
import os
import sys
import tempfile

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args(argv)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modeling_gap.tiny import build_tiny_gap

    output = args.output or tempfile.mkdtemp(prefix="gap-demo-")
    model, processor = build_tiny_gap(seed=0)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    print(f"saved and reloaded {type(model).__name__} from {output} ({type(model).__module__})")

    image = Image.new("RGB", (56, 56), (200, 40, 40))
    crop = Image.new("RGB", (56, 56), (240, 120, 120))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the sign?"}]},
        {"role": "assistant", "content": "I need a closer look at the sign. <|latent|> It reads red."},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(images=[image], text=[text], aux_images=[[crop]], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
        hidden = out.latent_predictions  # (spans, K, d)
    print(f"one forward with a latent span of K={model.config.num_latent_tokens}: loss {out.loss.item():.3f} "
          f"(ce {out.ce_loss.item():.3f} + {model.config.latent_loss_weight} x latent {out.latent_loss.item():.3f})")
    target_norm = out.latent_targets.norm(dim=-1).mean().item()
    print(f"latent predictions {tuple(hidden.shape)}; mean target norm {target_norm:.3f}")
    print(processor.batch_decode(batch["input_ids"], skip_special_tokens=False)[0])


if __name__ == "__main__":
    main()
