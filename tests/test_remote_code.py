"""A saved GAP checkpoint loads through the Auto classes from its own copied code, from a directory and from a
Hub cache, and gives the same logits."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from testing_utils import COLORS, chat, solid_image

LOAD_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForImageTextToText, AutoModelForCausalLM, AutoProcessor
source, batch_path = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
causal = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True)
batch = torch.load(batch_path, weights_only=True)
with torch.no_grad():
    logits = model(**batch).logits
torch.save(logits, batch_path + ".out")
print(json.dumps({
    "model_class": type(model).__name__, "model_module": type(model).__module__,
    "causal_class": type(causal).__name__,
    "processor_class": type(processor).__name__, "processor_module": type(processor).__module__,
    "num_latent_tokens": processor.num_latent_tokens,
    "latent_ids": list(processor.latent_token_ids),
}))
"""


def _batch(processor):
    texts = [chat(processor, "What colour?", "Look <|latent|> it is red."), chat(processor, "Which corner is light?")]
    processor.tokenizer.padding_side = "left"
    batch = processor(
        images=[solid_image(COLORS[0]), solid_image(COLORS[1])], text=texts,
        aux_images=[[solid_image(COLORS[2])], []], padding=True, return_tensors="pt",
    )
    return dict(batch)


def _load_in_fresh_process(source, batch, tmp_path, extra_env=None):
    batch_path = str(tmp_path / "batch.pt")
    torch.save(batch, batch_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf_home_fresh") if not extra_env else extra_env.pop("HF_HOME")
    env.update(extra_env or {})
    # Run away from the repository so that `modeling_gap` can only come from the checkpoint's copied code.
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, source, batch_path], capture_output=True, text=True, env=env,
        cwd=str(tmp_path), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    return info, torch.load(batch_path + ".out", weights_only=True)


def _check(info, logits, expected, processor):
    assert info["model_class"] == "GapQwen2_5VLForConditionalGeneration"
    assert info["model_module"].startswith("transformers_modules"), info["model_module"]
    assert info["causal_class"] == "GapQwen2_5VLForConditionalGeneration"
    assert info["processor_class"] == "GapQwen2_5VLProcessor"
    assert info["processor_module"].startswith("transformers_modules"), info["processor_module"]
    assert info["num_latent_tokens"] == processor.num_latent_tokens
    assert tuple(info["latent_ids"]) == processor.latent_token_ids
    assert torch.equal(logits, expected)


def test_round_trip_from_directory(tiny_gap, tmp_path):
    model, processor = tiny_gap
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    files = set(os.listdir(out))
    assert {"configuration_gap.py", "modeling_gap.py", "processing_gap.py", "model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModelForImageTextToText", "AutoModelForCausalLM"}

    batch = _batch(processor)
    with torch.no_grad():
        expected = model(**batch).logits
    info, logits = _load_in_fresh_process(str(out), batch, tmp_path)
    _check(info, logits, expected, processor)


def test_round_trip_from_offline_hub_cache(tiny_gap, tmp_path):
    model, processor = tiny_gap
    sha = "0123456789abcdef0123456789abcdef01234567"
    hf_home = tmp_path / "hf_home"
    repo = hf_home / "hub" / "models--gap-org--tiny-gap"
    snapshot = repo / "snapshots" / sha
    model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)

    batch = _batch(processor)
    with torch.no_grad():
        expected = model(**batch).logits
    info, logits = _load_in_fresh_process(
        "gap-org/tiny-gap", batch, tmp_path, extra_env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    )
    _check(info, logits, expected, processor)
    shutil.rmtree(hf_home)


def test_from_qwen2_5_vl_reconfigures_a_gap_checkpoint(tmp_path):
    from modeling_gap import from_qwen2_5_vl
    from trainers.tiny import build_tiny_gap

    model, processor = build_tiny_gap(seed=0)
    model.latent_head.ema_norm.fill_(2.5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, again_processor = from_qwen2_5_vl(str(tmp_path), num_latent_tokens=8, latent_feedback="raw")
    assert again.config.num_latent_tokens == 8 and again_processor.num_latent_tokens == 8
    assert again.config.latent_feedback == "raw"
    assert float(again.latent_head.ema_norm) == 2.5  # the head was kept
    assert again.config.latent_token_ids == model.config.latent_token_ids
    assert again_processor.latent_span.count(again_processor.latent_pad_token) == 8
    for changes in (dict(preset="monet"), dict(latent_pca_rank=8), dict(latent_pad_token="<x>")):
        with pytest.raises(ValueError, match="Convert the stock Qwen2.5-VL checkpoint"):
            from_qwen2_5_vl(str(tmp_path), **changes)
    with pytest.raises(ValueError, match="num_latent_tokens"):
        from_qwen2_5_vl(str(tmp_path), num_latent_tokens=0)
