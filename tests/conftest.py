import os
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(2)


def solid_image(color, size=56):
    """A size x size RGB image: one colour with a lighter square in a corner, so images differ in layout."""
    image = Image.new("RGB", (size, size), color)
    corner = tuple(min(c + 90, 255) for c in color)
    for x in range(size // 4):
        for y in range(size // 4):
            image.putpixel((x, y), corner)
    return image


COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def chat(processor, question, answer=None):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    if answer is None:
        return processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    return processor.apply_chat_template([user, {"role": "assistant", "content": answer}], tokenize=False)


@pytest.fixture(scope="session")
def tiny_gap():
    from modeling_gap.tiny import build_tiny_gap

    model, processor = build_tiny_gap(seed=0)
    return model, processor


@pytest.fixture
def fresh_tiny_gap():
    from modeling_gap.tiny import build_tiny_gap

    return build_tiny_gap(seed=0)
