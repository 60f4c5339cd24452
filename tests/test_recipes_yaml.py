"""The YAML recipes under `recipes/`: each parses into its script's dataclasses, and the tiny SFT recipe's output
publishes.

- Every `recipes/**/*.yaml` (the accelerate configs aside: `test_trainer.py::test_accelerate_configs_load` loads
  those) names its launch command in its header comment; the script it names parses it with `TrlParser`, every key a
  field of that script's dataclasses, with the value the YAML gives. A key no dataclass knows fails the parse.
- The SFT recipes follow the open-r1 layout (`# Model arguments`, `# Data training arguments`, `# GAP SFT trainer
  config`) and set only `ModelConfig` / `GapScriptArguments` fields that `recipes/sft.py` reads.
- `recipes/sft.py --config recipes/tiny/gap/config_demo.yaml` (a few steps, on CPU, in a subprocess) writes a checkpoint
  that `recipes/push_to_hub.py` publishes to the local Hub of `test_push_to_hub.py`.
"""

import dataclasses
import enum
import glob
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from test_evaluation import load_recipe
from test_push_to_hub import VARIANT, hub, push  # noqa: F401 - `hub` is the module-scoped local Hub fixture

DEMO = os.path.join(ROOT, "recipes", "tiny", "gap", "config_demo.yaml")
SFT_7B = {name: os.path.join(ROOT, "recipes", "qwen2_5_vl_7b", "gap", f"config_{name}.yaml")
          for name in ("full", "lora", "qlora")}
RECIPE_YAMLS = sorted(
    path for path in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True)
    if "accelerate_configs" not in os.path.relpath(path, ROOT).split(os.sep)
)
# The dataclasses each recipe script parses (in its `__main__` block): a YAML naming another script fails until added.
PARSERS = {
    "sft": lambda module: module.make_parser(),
    "fit_pca": lambda module: _trl_parser(module.FitPCAArguments),
    "assign_capacity": lambda module: _trl_parser(module.CapacityArguments),
}
SFT_SECTIONS = ("# Model arguments", "# Data training arguments", "# GAP SFT trainer config")


def _trl_parser(*dataclass_types):
    from trl import TrlParser

    return TrlParser(dataclass_types)


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def launch_commands(path: str) -> list[tuple[str, str, str | None]]:
    """(script, --config path, accelerate --config_file or None) of each launch command in the YAML's header comment."""
    header = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            header.append(line.rstrip("\n"))
    text = re.sub(r"\\\s*\n#\s*", " ", "\n".join(header))  # join `\`-continued command lines
    commands = []
    for line in text.splitlines():
        match = re.search(r"(?:python|accelerate launch)\s.*?\brecipes/(\w+)\.py\s.*?--config\s+(\S+)", line)
        if match:
            config_file = re.search(r"--config_file[=\s]+(\S+)", line)
            commands.append((match.group(1), match.group(2), config_file.group(1) if config_file else None))
    return commands


def script_of(path: str) -> str:
    commands = launch_commands(path)
    assert commands, f"{rel(path)}: the header comment gives no launch command (python|accelerate launch ... " \
                     f"recipes/<script>.py ... --config {rel(path)})"
    scripts = {script for script, _, _ in commands}
    assert len(scripts) == 1, f"{rel(path)}: the header launches several scripts {scripts}"
    return scripts.pop()


def recipe_parser(script: str):
    assert script in PARSERS, f"no parser known for recipes/{script}.py: add it to PARSERS"
    return PARSERS[script](load_recipe(script))  # a fresh parser: TrlParser keeps a config's values as its defaults


def read_yaml(path: str) -> dict:
    with open(path) as f:
        raw = yaml.safe_load(f)
    assert isinstance(raw, dict), rel(path)
    return raw


def parse(path: str, *extra: str):
    """The parsed dataclass instances, the parser and the arguments given on top of the YAML."""
    raw = read_yaml(path)
    script = script_of(path)
    parser = recipe_parser(script)
    # This test machine has no GPU: `bf16: true` (the 7B recipes) makes TrainingArguments' __post_init__ refuse
    # ("doesn't support bf16/gpu") unless `use_cpu` is set. Only `use_cpu` is overridden, so bf16 is still checked.
    overrides = ["--use_cpu", "true"] if script == "sft" and raw.get("bf16") and not raw.get("use_cpu") else []
    overrides += list(extra)
    return parser.parse_args_and_config(args=["--config", path, *overrides]), parser, overrides


def as_yaml_value(key: str, value):
    """A parsed value in the form a YAML file gives it (TrainingArguments turns some strings into enums or lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if key == "report_to" and value == []:
        return "none"
    return value


# ---- every recipe parses, into the dataclasses of the script it names ------------------------------------------------
def test_the_recipes_are_found():
    assert {rel(p) for p in [DEMO, *SFT_7B.values()]} <= {rel(p) for p in RECIPE_YAMLS}


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=rel)
def test_recipe_parses_into_its_scripts_dataclasses(path):
    for script, config, config_file in launch_commands(path):
        assert config == rel(path), f"{rel(path)}: the launch command's --config is {config}"
        assert os.path.isfile(os.path.join(ROOT, "recipes", f"{script}.py")), script
        if config_file is not None:
            assert os.path.isfile(os.path.join(ROOT, config_file)), f"{rel(path)}: no accelerate config {config_file}"
    raw = read_yaml(path)
    parsed, parser, overrides = parse(path)
    owner = {f.name: cls for cls in parser.dataclass_types for f in dataclasses.fields(cls)}
    assert not sorted(set(raw) - set(owner)), f"{rel(path)}: keys no dataclass of the script knows"
    instances = {type(obj): obj for obj in parsed}
    overridden = {flag.lstrip("-") for flag in overrides[::2]}
    for key, value in raw.items():
        if key in overridden:
            continue
        got = as_yaml_value(key, getattr(instances[owner[key]], key))
        assert got == value, f"{rel(path)}: {key} is {got!r} after parsing, the YAML says {value!r}"


def test_an_unknown_or_misspelt_key_fails_the_parse(tmp_path):
    # TrlParser's parse_args_and_config (fail_with_unknown_args=True by default) raises on a config key that no
    # dataclass field takes, instead of dropping it.
    raw = read_yaml(DEMO)
    raw["learning_rte"] = 1.0e-3
    path = tmp_path / "config_demo_typo.yaml"
    path.write_text("# python recipes/sft.py --config x.yaml\n" + yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"Unknown arguments from config file: \['--learning_rte', '0.001'\]"):
        recipe_parser("sft").parse_args_and_config(args=["--config", str(path)])


# ---- the SFT recipes: layout, and nothing that sft.py would ignore ---------------------------------------------------
SFT_YAMLS = [p for p in RECIPE_YAMLS if script_of(p) == "sft"]


@pytest.mark.parametrize("path", SFT_YAMLS, ids=rel)
def test_sft_recipe_keys_sit_in_their_section_and_are_read_by_the_script(path):
    sft = load_recipe("sft")
    from trl import ModelConfig

    with open(path) as f:
        lines = f.read().splitlines()
    assert [line for line in lines if line in SFT_SECTIONS] == list(SFT_SECTIONS), rel(path)
    section, sections, keys = None, {}, []
    for line in lines:
        if line in SFT_SECTIONS:
            section = line
        elif match := re.match(r"^(\w+):", line):
            keys.append(match.group(1))
            sections[match.group(1)] = section
    assert len(keys) == len(set(keys)), f"{rel(path)}: a key given twice (YAML keeps the last silently)"
    assert set(sections) == set(read_yaml(path)) and None not in sections.values(), \
        f"{rel(path)}: keys above the first section"

    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    script_fields = {f.name for f in dataclasses.fields(sft.GapScriptArguments)}
    with open(os.path.join(ROOT, "recipes", "sft.py")) as f:
        source = f.read()
    read = set(re.findall(r"(?:model_args|script_args)\.(\w+)", source))
    for key, section in sections.items():
        if key in model_fields:
            assert section == SFT_SECTIONS[0], f"{rel(path)}: {key} belongs under '{SFT_SECTIONS[0]}'"
        elif key in script_fields:
            assert section in SFT_SECTIONS[:2], f"{rel(path)}: {key} belongs under a model or data section"
        else:  # GapSFTConfig
            assert section == SFT_SECTIONS[2], f"{rel(path)}: {key} belongs under '{SFT_SECTIONS[2]}'"
        if key in model_fields | script_fields:
            assert key in read, f"{rel(path)}: recipes/sft.py never reads {key} (e.g. LoRA's task type)"


def test_the_7b_recipes_hold_the_real_settings():
    push_to_hub = load_recipe("push_to_hub")
    variants = {
        name: push_to_hub.HubVariant.from_file(os.path.join(ROOT, "hub_configs", f"gap-qwen2.5-vl-7b-{name}.yaml"))
        for name in ("pca", "pca-init", "pca-lora")
    }
    runs = {}
    for name, path in SFT_7B.items():
        (script_args, training_args, model_args), _, _ = parse(path)
        runs[name] = (script_args, training_args, model_args)
        # K and feedback of the published variant; the model is the fitted checkpoint that the LoRA variant builds on
        assert (script_args.num_latent_tokens, script_args.latent_feedback) == (8, "pca")
        assert (variants["pca"].num_latent_tokens, variants["pca"].latent_feedback) == (8, "pca")
        assert os.path.basename(model_args.model_name_or_path) == variants["pca-init"].name
        assert variants["pca-lora"].base_model.endswith("/" + variants["pca-init"].name)
        assert training_args.bf16 and model_args.dtype == "bfloat16"
        assert training_args.capacity_guided and training_args.freeze_vision_tower and training_args.validate_dataset
        assert training_args.per_device_train_batch_size == 1 and training_args.gradient_accumulation_steps > 1
        assert training_args.activation_checkpointing and training_args.report_to == []
        assert training_args.save_strategy.value == "steps" and training_args.output_dir.startswith("outputs/")
        (_, _, config_file), = launch_commands(path)
        if config_file.endswith("ddp.yaml"):  # plain-text rows leave the latent head without a gradient
            assert training_args.ddp_find_unused_parameters, name
    full, lora, qlora = (runs[n][1:] for n in ("full", "lora", "qlora"))
    assert not full[1].use_peft and full[0].learning_rate == 1e-5
    for training_args, model_args in (lora, qlora):
        assert model_args.use_peft and training_args.learning_rate == 1e-4
        assert model_args.lora_target_modules is None  # trainers.GAP_LORA_TARGET_MODULES: the language model only
    assert not lora[1].load_in_4bit and qlora[1].load_in_4bit and qlora[1].bnb_4bit_quant_type == "nf4"
    assert len({runs[n][1].output_dir for n in runs}) == 3


# ---- the tiny recipe trains on CPU and its output publishes ----------------------------------------------------------
def test_tiny_sft_recipe_writes_a_checkpoint_that_push_to_hub_publishes(hub, tmp_path):  # noqa: F811
    output = tmp_path / "tiny-gap-sft"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="2")
    trained = subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "sft.py"), "--config", rel(DEMO), "--output_dir", str(output),
         "--max_steps", "4", "--synthetic_rows", "8", "--fit_pca_rows", "4", "--save_steps", "2",
         "--logging_steps", "1", "--warmup_steps", "0", "--disable_tqdm", "true"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    written = set(os.listdir(output))
    assert {"config.json", "model.safetensors", "modeling_gap.py", "processor_config.json", "train_results.json",
            "training_args.bin", "checkpoint-4"} <= written, written

    repo_id = "acme/gap-tiny-sft-demo"
    pushed = push(hub, tmp_path, "--variant", VARIANT, "--checkpoint", str(output), "--repo-id", repo_id)
    assert pushed.returncode == 0, pushed.stdout[-2000:] + pushed.stderr[-3000:]
    sha = hub.repo(repo_id).branches["main"]
    assert f"published {repo_id} at {sha}" in pushed.stdout
    left_out = re.search(r"left out of the upload: (.*)", pushed.stdout).group(1).split(", ")
    assert {"checkpoint-4", "training_args.bin", "trainer_state.json"} <= set(left_out)
    files = hub.files(repo_id)
    assert {"README.md", "config.json", "model.safetensors", "modeling_gap.py", "processor_config.json"} <= set(files)
    assert not any(name.startswith("checkpoint-") or name.endswith(".bin") for name in files)
    assert files["model.safetensors"] == (output / "model.safetensors").read_bytes()  # the trained weights
