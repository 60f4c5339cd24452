"""`recipes/fit_pca.py` and `recipes/assign_capacity.py` on a tiny model and dataset."""

import json

import datasets
import torch

from conftest import COLORS, solid_image
from test_evaluation import load_recipe


def _training_split(path, n=6):
    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "aux_images": datasets.List(datasets.Image()),
        "answer": datasets.Value("string"),
    })
    rows = dict(
        images=[[solid_image(COLORS[i % 6])] for i in range(n)],
        messages=[[{"role": "user", "content": f"What colour is square {i}?"},
                   {"role": "assistant", "content": f"Let me look. <|latent|> It is colour {i}. Answer: {i}"}]
                  for i in range(n)],
        aux_images=[[solid_image(COLORS[(i + 2) % 6], size=84)] for i in range(n)],
        answer=[str(i) for i in range(n)],
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return str(path)


def test_fit_pca_converts_fits_and_the_reloaded_model_uses_the_buffers(tmp_path):
    from transformers import AutoModelForImageTextToText

    from modeling_gap.tiny import save_tiny_qwen2_5_vl

    stock = save_tiny_qwen2_5_vl(str(tmp_path / "stock"))
    split = _training_split(tmp_path / "data")
    fit_pca = load_recipe("fit_pca")
    args = fit_pca.FitPCAArguments(model_name_or_path=stock, dataset_name=split, num_latent_tokens=4,
                                   max_images=10, batch_size=4, output_dir=str(tmp_path / "gap"))
    summary = fit_pca.main(args)
    assert summary["vectors"] > 10 and summary["rank"] == 64  # rank 256 capped at the tiny hidden size
    assert json.load(open(tmp_path / "gap" / "pca_fit.json"))["vectors"] == summary["vectors"]

    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "gap"), trust_remote_code=True)
    head = model.latent_head
    assert head.pca_mean.abs().sum() > 0 and float(head.ema_norm) > 0
    assert not torch.equal(head.pca_components, torch.eye(64))  # fitted, not the initial basis
    assert torch.allclose(head.pca_components.T @ head.pca_components, torch.eye(64), atol=1e-4)
    # Its latents are the fitted subspace's: mean + U (s * coords).
    states = torch.randn(5, 64)
    latents = head(states, model.config.latent_feedback)
    expected = head.pca_mean + (head.proj(head.norm(states)) * head.pca_scale) @ head.pca_components.T
    assert torch.allclose(latents, expected, atol=1e-5)


def test_assign_capacity_writes_columns_and_a_summary_that_adds_up(tmp_path):
    from modeling_gap.tiny import build_tiny_gap

    model, processor = build_tiny_gap()
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    split = _training_split(tmp_path / "data")
    assign = load_recipe("assign_capacity")
    args = assign.CapacityArguments(model_name_or_path=str(tmp_path / "base"), dataset_name=split, num_samples=2,
                                    max_new_tokens=4, capacity_threshold=0.5, output_dir=str(tmp_path / "out"))
    summary = assign.main(args)
    assigned = datasets.load_from_disk(str(tmp_path / "out"))
    assert {"base_pass_rate", "use_latent"} <= set(assigned.column_names)
    assert len(assigned) == summary["rows"] == 6
    assert summary["use_latent"] + summary["plain_text"] == summary["rows"]
    assert sum(summary["pass_rate_histogram"].values()) == summary["rows"]
    for rate, use in zip(assigned["base_pass_rate"], assigned["use_latent"]):
        assert rate in (0.0, 0.5, 1.0) and use == (rate <= 0.5)
    assert json.load(open(tmp_path / "out" / "capacity_summary.json")) == summary


def test_pass_rate_counts_matching_answers(tmp_path):
    """The rate is the fraction of sampled answers that match: a base that always answers right scores 1."""
    from transformers import LogitsProcessor

    from modeling_gap.tiny import build_tiny_gap

    assign = load_recipe("assign_capacity")
    model, processor = build_tiny_gap()
    split = datasets.load_from_disk(_training_split(tmp_path / "data", n=2))
    rows = assign.question_rows(split)
    digit = processor.tokenizer.convert_tokens_to_ids("1")
    eos = model.generation_config.eos_token_id

    class SayOne(LogitsProcessor):
        """The first generated token is "1", the next ends the turn (every sample has the same prompt length)."""

        prompt_length = None

        def __call__(self, input_ids, scores):
            self.prompt_length = self.prompt_length or input_ids.shape[1]
            scores = torch.full_like(scores, -1e9)
            scores[:, digit if input_ids.shape[1] == self.prompt_length else eos] = 0
            return scores

    original = model.generate

    say_one = SayOne()

    def forced(**kwargs):
        return original(logits_processor=[say_one], **kwargs)

    model.generate = forced
    args = assign.CapacityArguments(num_samples=2, max_new_tokens=3)
    rates = assign.pass_rates(model, processor, rows, args)
    assert rates == [0.0, 1.0]  # rows answer "0" and "1"; the model always says 1
