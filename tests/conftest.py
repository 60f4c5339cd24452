"""Fixtures shared by the tests (helpers are in `testing_utils.py`)."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_gap():
    """The tiny random GAP model and processor, shared by the whole session: do not modify it."""
    from trainers.tiny import build_tiny_gap

    return build_tiny_gap(seed=0)


@pytest.fixture
def fresh_tiny_gap():
    """A tiny random GAP model and processor of one's own."""
    from trainers.tiny import build_tiny_gap

    return build_tiny_gap(seed=0)


@pytest.fixture(scope="module")
def hub():
    """A local server speaking the Hub API (`hub_server.py`), one per test module."""
    from hub_server import HubServer
    from testing_utils import HUB_TOKEN

    with HubServer(token=HUB_TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny GAP model saved as a checkpoint directory (weights, remote code, processor)."""
    from trainers.tiny import build_tiny_gap

    model, processor = build_tiny_gap(seed=0)
    path = tmp_path_factory.mktemp("tiny_ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint_and_split(tmp_path_factory):
    """(tiny GAP checkpoint dir, a 4-row evaluation split dir with `question` / `choices` columns, their root)."""
    import datasets

    from testing_utils import COLORS, solid_image
    from trainers.tiny import build_tiny_gap

    root = tmp_path_factory.mktemp("eval")
    model, processor = build_tiny_gap(seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    features = datasets.Features({"images": datasets.List(datasets.Image()), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "choices": datasets.List(datasets.Value("string"))})
    rows = dict(images=[[solid_image(c)] for c in COLORS[:4]],
                question=["Colour?", "Which corner?", "How many squares?", "Colour?"],
                answer=["A", "B", "2", "C"], choices=[["red", "green", "blue"], ["left", "right"], [], ["a", "b", "c"]])
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "split"))
    return str(root / "model"), str(root / "split"), root
