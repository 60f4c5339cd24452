"""`trainers.capacity` (`gap assign-capacity`): pass rates of the base model and the use_latent column."""

import json

import datasets
import torch

from testing_utils import save_training_split
from trainers.arguments import CapacityArguments
from trainers.capacity import assign_capacity, pass_rates, question_rows


def test_assign_capacity_writes_columns_and_a_summary_that_adds_up(tmp_path):
    from trainers.tiny import build_tiny_gap

    model, processor = build_tiny_gap()
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    split = save_training_split(tmp_path / "data")
    args = CapacityArguments(model_name_or_path=str(tmp_path / "base"), dataset_name=split, num_samples=2,
                             max_new_tokens=4, capacity_threshold=0.5, output_dir=str(tmp_path / "out"))
    summary = assign_capacity(args)
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

    from trainers.tiny import build_tiny_gap

    model, processor = build_tiny_gap()
    split = datasets.load_from_disk(save_training_split(tmp_path / "data", n=2))
    rows = question_rows(split)
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
    rates = pass_rates(model, processor, rows, num_samples=2, max_new_tokens=3, progress=False)
    assert rates == [0.0, 1.0]  # rows answer "0" and "1"; the model always says 1
