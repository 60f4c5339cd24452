"""`gap memory-plan`: exact parameter counts from the meta device, trainable counts equal to what training trains."""

import os

import pytest

from testing_utils import ROOT
from trainers.memory_plan import MemoryPlanArguments, memory_plan, meta_gap_model, plan_recipe, read_recipe
from trainers.model_loader import gap_lora_config
from trainers.tiny import build_tiny_gap


def test_the_7b_plan_counts_qwen2_5_vl_7b_and_prints_every_recipe(capsys):
    rows = memory_plan(MemoryPlanArguments(recipes=[os.path.join(ROOT, p) for p in (
        "recipes/qwen2_5_vl_7b/sft/config_pca.yaml", "recipes/qwen2_5_vl_7b/sft/config_pca_lora.yaml",
        "recipes/qwen2_5_vl_7b/sft/config_pca_qlora.yaml")]))
    # Qwen2.5-VL-7B-Instruct has 8,292,166,656 parameters; GAP adds the latent head (RMSNorm + 3584 x 256).
    head = 3584 + 3584 * 256
    assert [r["parameters"] for r in rows] == [8_292_166_656 + head] * 3
    full, lora, qlora = rows
    assert full["gpus"] == 8 and lora["gpus"] == qlora["gpus"] == 1
    assert qlora["weights_gib"] < lora["weights_gib"] / 2  # the language model's linear weights in 4 bits
    assert full["trainable_parameters"] > 7e9 and lora["trainable_parameters"] < 2e8
    table = capsys.readouterr().out
    assert table.count("\n| ") == 3 and "ZeRO-3 over 8 GPUs" in table and "QLoRA" in table


def test_zero3_shards_weights_gradients_and_optimizer_over_the_gpus():
    model = meta_gap_model()
    recipe = read_recipe(os.path.join(ROOT, "recipes/qwen2_5_vl_7b/sft/config_pca.yaml"))
    eight, four = plan_recipe(model, recipe, 8), plan_recipe(model, recipe, 4)
    for key in ("gradients_gib", "optimizer_gib"):
        assert eight[key] == pytest.approx(four[key] / 2)
    assert eight["weights_gib"] < four["weights_gib"] and eight["activations_gib"] == four["activations_gib"]


def test_trainable_counts_equal_the_models_that_train():
    """On the tiny model: the plan's trainable parameters are those of the frozen-tower full fine-tune and of the
    PEFT model `gap_lora_config` builds (real PEFT)."""
    from peft import get_peft_model

    model, _ = build_tiny_gap(seed=0)
    recipe = read_recipe(os.path.join(ROOT, "recipes/tiny/sft/config_pca_lora.yaml"))
    planned = plan_recipe(model, recipe, 1)["trainable_parameters"]
    peft_model = get_peft_model(model, gap_lora_config(r=int(recipe.get("lora_r", 16))))
    assert planned == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    model, _ = build_tiny_gap(seed=0)
    model.model.visual.requires_grad_(False)
    full = plan_recipe(model, read_recipe(os.path.join(ROOT, "recipes/tiny/sft/config_pca.yaml")), 2)
    assert full["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert full["parameters"] == sum(p.numel() for p in model.parameters())
