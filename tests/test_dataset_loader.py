"""`trainers.dataset_loader`: splits from a save_to_disk folder (Dataset or DatasetDict) or the synthetic task."""

import datasets
import pytest

from trainers.dataset_loader import SYNTHETIC_SPLITS, load_split


def test_synthetic_splits_are_seeded_and_distinct():
    train, again, test = load_split("synthetic", "train"), load_split("synthetic", "train"), load_split("synthetic", "test")
    assert len(train) == SYNTHETIC_SPLITS["train"][0] and len(test) == SYNTHETIC_SPLITS["test"][0]
    assert train[0]["messages"] == again[0]["messages"] and train[0]["messages"] != test[0]["messages"]
    with pytest.raises(KeyError, match="no 'validation'"):
        load_split("synthetic", "validation")


def test_a_saved_dataset_or_dataset_dict_gives_its_split(tmp_path):
    rows = datasets.Dataset.from_dict({"answer": ["a", "b"]})
    rows.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict(train=rows, test=rows.select([0])).save_to_disk(str(tmp_path / "two"))
    assert len(load_split(str(tmp_path / "one"), "anything")) == 2  # a Dataset is its own only split
    assert len(load_split(str(tmp_path / "two"), "test")) == 1
    with pytest.raises(KeyError, match=r"has splits \['train', 'test'\]; no 'dev'"):
        load_split(str(tmp_path / "two"), "dev")
