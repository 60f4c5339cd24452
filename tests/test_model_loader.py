"""`trainers.model_loader`: one loader for every stage: tiny, stock (converted or kept), GAP checkpoint; pickled
weights refused unless allowed; a GAP checkpoint's own K and feedback never silently replaced."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from trainers.model_loader import load_model
from trainers.tiny import save_tiny_qwen2_5_vl


def test_tiny_stock_converted_and_kept(tmp_path):
    model, processor = load_model("tiny", gap_options=dict(num_latent_tokens=3), seed=1)
    assert model.config.num_latent_tokens == 3 and processor.tokenizer.eos_token == "<|im_end|>"
    stock = save_tiny_qwen2_5_vl(str(tmp_path / "stock"))
    converted, converted_processor = load_model(stock, gap_options=dict(num_latent_tokens=4, latent_pca_rank=16))
    assert type(converted).__name__ == "GapQwen2_5VLForConditionalGeneration"
    assert converted.config.num_latent_tokens == converted_processor.num_latent_tokens == 4
    kept, _ = load_model(stock, stock="keep")
    assert type(kept).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_a_gap_checkpoint_keeps_its_own_settings_or_the_load_is_refused(tiny_checkpoint):
    model, processor = load_model(str(tiny_checkpoint))  # no trust_remote_code: the package's classes
    assert type(model).__name__ == "GapQwen2_5VLForConditionalGeneration"
    same, _ = load_model(str(tiny_checkpoint), gap_options=dict(num_latent_tokens=model.config.num_latent_tokens))
    assert same.config.num_latent_tokens == model.config.num_latent_tokens
    with pytest.raises(ValueError, match=r"num_latent_tokens=4, not 6: .*from_qwen2_5_vl"):
        load_model(str(tiny_checkpoint), gap_options=dict(num_latent_tokens=6))


def test_pickled_weights_are_refused_unless_allowed(tiny_checkpoint, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"no safetensors weights.*allow_pickle_weights"):
        load_model(str(pickled))
    model, _ = load_model(str(pickled), allow_pickle_weights=True)
    assert type(model).__name__ == "GapQwen2_5VLForConditionalGeneration"


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        load_model(str(tmp_path / "absent"))
