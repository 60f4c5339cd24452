"""The paper's norm diagnosis for any Qwen2.5-VL or GAP checkpoint.

    python recipes/diagnose_norms.py --model_name_or_path ORG/gap-7b --dataset_name DIR --limit 32 \\
        --output_dir outputs/norms

Per layer, the mean hidden-state norm at text and at image positions, against the mean norm of the input
embeddings at those positions (GAP's motivation: on Monet-7B the final text states are ~546x their input embeddings,
the vision states ~8.7x). Layer 0 is the input embeddings; the last layer is after the final norm, the state a
model reads (and Monet-style models feed back). Also the norm of what each feedback mode would feed back from the
final states, against the mean visual input embedding norm. Writes `norms.json` and `norms.png`.
"""

import json
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from trainers.evaluation import EvalArguments, build_prompt, load_eval_rows, load_model_and_processor  # noqa: E402


@torch.no_grad()
def diagnose(model, processor, rows, batch_size: int = 8) -> dict:
    """Mean norms per layer at text / image positions over `rows` (EvalRows), their ratios to the input embedding
    norms, and the norms of the latents each feedback mode would feed back (GAP models)."""
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    sums = None
    fed = {"raw": [], "ema_norm": [], "pca": []}
    visual_norms = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        inputs = processor(images=[i.convert("RGB") for r in chunk for i in r.images],
                           text=[build_prompt(processor, r) for r in chunk], padding=True, return_tensors="pt").to(device)
        outputs = model.model(**inputs, output_hidden_states=True)
        real = inputs["attention_mask"].bool()
        image = (inputs["input_ids"] == model.config.image_token_id) & real
        text = real & ~image
        norms = torch.stack(outputs.hidden_states).float().norm(dim=-1)  # (layers + 1, B, L)
        batch_sums = torch.stack([
            (norms * text).sum((1, 2)), text.sum().expand(norms.shape[0]).float(),
            (norms * image).sum((1, 2)), image.sum().expand(norms.shape[0]).float(),
        ])
        sums = batch_sums if sums is None else sums + batch_sums
        visual_norms.append(norms[0][image])
        last = outputs.last_hidden_state[:, -1]  # the state the next position (a latent slot) is computed from
        fed["raw"].append(last.float().norm(dim=-1))
        head = getattr(model, "latent_head", None)
        if head is not None:
            fed["pca"].append(head(last, feedback="pca").float().norm(dim=-1))
            if float(head.ema_norm) > 0:
                fed["ema_norm"].append(head(last, feedback="ema_norm").float().norm(dim=-1))
    text_mean, image_mean = (sums[0] / sums[1]).tolist(), (sums[2] / sums[3]).tolist()
    visual_embedding_norm = torch.cat(visual_norms).mean().item()
    result = dict(
        layers=list(range(len(text_mean))),
        text_norm=text_mean,
        image_norm=image_mean,
        text_ratio=[n / text_mean[0] for n in text_mean],
        image_ratio=[n / image_mean[0] for n in image_mean],
        visual_input_embedding_norm=visual_embedding_norm,
        feedback_norm={k: torch.cat(v).mean().item() for k, v in fed.items() if v},
    )
    result["feedback_ratio"] = {k: v / visual_embedding_norm for k, v in result["feedback_norm"].items()}
    result["final_text_ratio"], result["final_image_ratio"] = result["text_ratio"][-1], result["image_ratio"][-1]
    return result


def plot(result: dict, path: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["layers"], result["text_ratio"], marker="o", label="text positions")
    ax.plot(result["layers"], result["image_ratio"], marker="s", label="image positions")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = input embeddings; last = after the final norm)")
    ax.set_ylabel("hidden-state norm / input-embedding norm")
    for mode, ratio in result["feedback_ratio"].items():
        ax.axhline(ratio, linestyle="--", linewidth=0.8, color={"raw": "red", "ema_norm": "green", "pca": "purple"}[mode],
                   label=f"fed back by {mode} / visual embedding norm")
    ax.set_title(title or "Norm regimes across depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: EvalArguments) -> dict:
    model, processor = load_model_and_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    result = diagnose(model, processor, load_eval_rows(args), batch_size=args.batch_size)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "norms.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.output_dir, "norms.png"), title=os.path.basename(str(args.model_name_or_path)))
    print(f"final states / input embeddings: text {result['final_text_ratio']:.1f}x, "
          f"image {result['final_image_ratio']:.1f}x; fed back / visual embedding norm: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["feedback_ratio"].items()))
    return result


if __name__ == "__main__":
    from trl import TrlParser

    (norm_args,) = TrlParser((EvalArguments,)).parse_args_and_config()
    main(norm_args)
