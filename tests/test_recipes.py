"""The recipes: every `recipes/<model>/<stage>/config_<variant>.yaml` parses into its stage's dataclasses (the same
parser as `gap <stage> --config`), every variant in `hub_configs/` names the recipe files that make it and they agree
with it, and the tiny SFT recipe trains on CPU (through the `gap` command) into a checkpoint that `gap push`
publishes; a second run on the finished output neither trains nor overwrites.
"""

import dataclasses
import enum
import glob
import os
import re

import pytest
import yaml

from testing_utils import ROOT, TINY_VARIANT, push, run_gap
from trainers.cli import STAGES, parse_stage
from trainers.hub import HubVariant

# recipes/<model>/<stage folder>/config_<variant>.yaml -> the `gap` stage
STAGE_OF_FOLDER = {"make_tiny": "make-tiny", "fit_pca": "fit-pca", "assign_capacity": "assign-capacity",
                   "sft": "sft", "eval": "eval"}
RECIPE_YAMLS = sorted(
    path for path in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True)
    if "accelerate_configs" not in os.path.relpath(path, ROOT).split(os.sep)
)
VARIANTS = sorted(glob.glob(os.path.join(ROOT, "hub_configs", "*.yaml")))
TINY_SFT = os.path.join(ROOT, "recipes", "tiny", "sft", "config_pca.yaml")
SFT_SECTIONS = ("# Model arguments", "# Data training arguments", "# GAP SFT trainer config")


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def stage_of(path: str) -> str:
    parts = rel(path).split(os.sep)
    assert len(parts) == 4 and parts[0] == "recipes" and re.fullmatch(r"config_\w+\.yaml", parts[3]), \
        f"{rel(path)}: recipes are laid out as recipes/<model>/<stage>/config_<variant>.yaml"
    assert parts[2] in STAGE_OF_FOLDER, f"{rel(path)}: unknown stage folder {parts[2]!r}"
    return STAGE_OF_FOLDER[parts[2]]


def read_yaml(path: str) -> dict:
    with open(path) as f:
        raw = yaml.safe_load(f)
    assert isinstance(raw, dict), rel(path)
    return raw


def parse(path: str, *extra: str):
    """The recipe parsed as `gap <stage> --config PATH` would parse it: {dataclass: instance}, and the overrides."""
    raw = read_yaml(path)
    stage = stage_of(path)
    # This test machine has no GPU: `bf16: true` (the 7B recipes) makes TrainingArguments' __post_init__ refuse
    # ("doesn't support bf16/gpu") unless `use_cpu` is set. Only `use_cpu` is overridden, so bf16 is still checked.
    overrides = ["--use_cpu", "true"] if stage == "sft" and raw.get("bf16") and not raw.get("use_cpu") else []
    parsed = parse_stage(stage, ["--config", path, *overrides, *extra])
    return {type(obj): obj for obj in parsed}, overrides


def field_of(instances: dict, name: str):
    for obj in instances.values():
        if name in {f.name for f in dataclasses.fields(obj)}:
            return getattr(obj, name)
    raise KeyError(name)


def as_yaml_value(key: str, value):
    """A parsed value in the form a YAML file gives it (TrainingArguments turns some strings into enums or lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if key == "report_to" and value == []:
        return "none"
    return value


# ---- every recipe parses, into the dataclasses of its stage ----------------------------------------------------------
def test_every_stage_folder_has_a_recipe_and_a_gap_stage():
    found = {stage_of(p) for p in RECIPE_YAMLS}
    assert found == set(STAGE_OF_FOLDER.values()) and found <= set(STAGES)


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=rel)
def test_recipe_parses_into_its_stages_dataclasses(path):
    raw = read_yaml(path)
    instances, overrides = parse(path)
    overridden = {flag.lstrip("-") for flag in overrides[::2]}
    for key, value in raw.items():
        if key in overridden:
            continue
        got = as_yaml_value(key, field_of(instances, key))
        assert got == value, f"{rel(path)}: {key} is {got!r} after parsing, the YAML says {value!r}"
    header = open(path).read().split("\n\n")[0]
    for command in re.findall(r"gap ([\w-]+) --config (\S+)", header):
        assert command[0] in STAGES and os.path.isfile(os.path.join(ROOT, command[1])), f"{rel(path)}: {command}"
    for config_file in re.findall(r"--config_file[=\s]+(\S+)", header):
        assert os.path.isfile(os.path.join(ROOT, config_file)), f"{rel(path)}: no accelerate config {config_file}"


def test_an_unknown_or_misspelt_key_fails_the_parse(tmp_path):
    # TrlParser's parse_args_and_config (fail_with_unknown_args=True by default) raises on a config key that no
    # dataclass field takes, instead of dropping it.
    raw = read_yaml(TINY_SFT)
    raw["learning_rte"] = 1.0e-3
    path = tmp_path / "config_typo.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"Unknown arguments from config file: \['--learning_rte', '0.001'\]"):
        parse_stage("sft", ["--config", str(path)])


# ---- the SFT recipes: layout, and nothing that the SFT stage would ignore --------------------------------------------
SFT_YAMLS = [p for p in RECIPE_YAMLS if stage_of(p) == "sft"]


@pytest.mark.parametrize("path", SFT_YAMLS, ids=rel)
def test_sft_recipe_keys_sit_in_their_section_and_are_read_by_the_stage(path):
    from trl import ModelConfig

    from trainers.arguments import GapScriptArguments

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
    script_fields = {f.name for f in dataclasses.fields(GapScriptArguments)}
    source = "".join(open(os.path.join(ROOT, "trainers", name)).read() for name in ("sft.py", "dataset_loader.py"))
    read = set(re.findall(r"(?:model_args|script_args)\.(\w+)", source))
    for key, section in sections.items():
        if key in model_fields:
            assert section == SFT_SECTIONS[0], f"{rel(path)}: {key} belongs under '{SFT_SECTIONS[0]}'"
        elif key in script_fields:
            assert section in SFT_SECTIONS[:2], f"{rel(path)}: {key} belongs under a model or data section"
        else:  # GapSFTConfig
            assert section == SFT_SECTIONS[2], f"{rel(path)}: {key} belongs under '{SFT_SECTIONS[2]}'"
        if key in model_fields | script_fields:
            assert key in read, f"{rel(path)}: the SFT stage never reads {key} (e.g. LoRA's task type)"


def test_the_7b_sft_recipes_hold_the_real_settings():
    runs = {}
    for name in ("pca", "pca_lora", "pca_qlora", "raw", "ema_norm"):
        instances, _ = parse(os.path.join(ROOT, "recipes", "qwen2_5_vl_7b", "sft", f"config_{name}.yaml"))
        script_args, training_args, model_args = instances.values()
        runs[name] = training_args, model_args
        assert training_args.bf16 and model_args.dtype == "bfloat16"
        assert training_args.capacity_guided and training_args.freeze_vision_tower and training_args.validate_dataset
        assert training_args.per_device_train_batch_size == 1 and training_args.gradient_accumulation_steps > 1
        assert training_args.activation_checkpointing and training_args.report_to == []
        assert training_args.save_strategy.value == "steps" and training_args.output_dir.startswith("outputs/")
        assert training_args.ddp_find_unused_parameters  # plain-text rows leave the latent head without a gradient
    assert not runs["pca"][1].use_peft and runs["pca"][0].learning_rate == 1e-5
    for training_args, model_args in (runs["pca_lora"], runs["pca_qlora"]):
        assert model_args.use_peft and training_args.learning_rate == 1e-4
        assert model_args.lora_target_modules is None  # trainers.GAP_LORA_TARGET_MODULES: the language model only
    assert not runs["pca_lora"][1].load_in_4bit and runs["pca_qlora"][1].load_in_4bit
    assert runs["pca_qlora"][1].bnb_4bit_quant_type == "nf4"
    assert len({training_args.output_dir for training_args, _ in runs.values()}) == len(runs)


# ---- every variant names the recipes that make it, and they agree with it --------------------------------------------
@pytest.fixture(scope="module")
def defaults():
    """(K, feedback, rank) of the tiny model and of a stock conversion, read from the code that applies them."""
    from modeling_gap import LATENT_PRESETS, GapQwen2_5VLConfig
    from trainers.tiny import build_tiny_gap

    tiny = build_tiny_gap()[0].config
    config = GapQwen2_5VLConfig()
    return dict(tiny=(tiny.num_latent_tokens, tiny.latent_feedback, tiny.latent_pca_rank),
                stock=(LATENT_PRESETS["gap"]["num_latent_tokens"], config.latent_feedback, config.latent_pca_rank))


def made_by(chain: list[str], defaults: dict) -> tuple:
    """(K, feedback, rank, preset) of what the last recipe of `chain` writes, following each stage's model from the
    outputs of the recipes before it."""
    outputs = {}  # output_dir -> "stock" or (K, feedback, rank)
    last = None
    for path in chain:
        instances, _ = parse(os.path.join(ROOT, path))
        stage = stage_of(path)
        get = lambda name: field_of(instances, name)  # noqa: E731
        if stage == "make-tiny":
            outputs[get("output_dir")] = "stock" if get("stock") else (
                get("num_latent_tokens"), get("latent_feedback"), defaults["tiny"][2])
        elif stage in ("fit-pca", "sft"):
            model = get("model_name_or_path")
            asked = (get("num_latent_tokens"), get("latent_feedback"),
                     get("latent_pca_rank") if stage == "fit-pca" else None)
            if model == "tiny":
                base = defaults["tiny"]
            elif outputs.get(model, "stock") == "stock":  # a stock checkpoint (made here, or a Hub id): converted
                base = defaults["stock"]
            else:
                base = outputs[model]
                assert all(a in (None, b) for a, b in zip(asked, base)), \
                    f"{path}: asks for {asked} on {model}, which is {base}"
            outputs[get("output_dir")] = tuple(b if a is None else a for a, b in zip(asked, base))
        else:
            continue
        last = get("output_dir")
    assert last is not None, f"{chain}: no recipe writes a model"
    return outputs[last]


@pytest.mark.parametrize("path", VARIANTS, ids=rel)
def test_a_variant_names_recipes_that_exist_parse_and_make_it(path, defaults):
    variant = HubVariant.from_file(path)
    assert variant.recipes, f"{rel(path)}: no `recipes:` list"
    for recipe in variant.recipes:
        assert os.path.isfile(os.path.join(ROOT, recipe)), f"{rel(path)}: {recipe} does not exist"
    made = made_by(variant.recipes, defaults)
    assert made == (variant.num_latent_tokens, variant.latent_feedback, variant.latent_pca_rank), rel(path)
    assert (variant.latent_preset, variant.latent_span_rule) == ("gap", "fixed")  # what the SFT stage converts to
    final = parse(os.path.join(ROOT, variant.recipes[-1]))[0]
    uses_peft = stage_of(variant.recipes[-1]) == "sft" and field_of(final, "use_peft")
    assert uses_peft == (variant.kind == "lora"), rel(path)


# ---- the tiny recipe trains on CPU through `gap sft`, refuses to run twice, and its output publishes ------------------
def test_tiny_sft_recipe_trains_refuses_a_second_run_and_publishes(hub, tmp_path):
    output = tmp_path / "tiny-gap-sft"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = ["sft", "--config", rel(TINY_SFT), "--output_dir", output, "--max_steps", "4", "--synthetic_rows", "8",
               "--fit_pca_rows", "4", "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "0",
               "--disable_tqdm", "true"]
    trained = run_gap(*command, env=env, timeout=300)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    written = set(os.listdir(output))
    assert {"config.json", "model.safetensors", "modeling_gap.py", "processor_config.json", "train_results.json",
            "training_args.bin", "checkpoint-4"} <= written, written

    weights = (output / "model.safetensors").read_bytes()
    again = run_gap(*command, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds a finished run" in again.stdout and "--overwrite_output_dir" in again.stdout
    assert "checkpoint-5" not in os.listdir(output) and (output / "model.safetensors").read_bytes() == weights

    repo_id = "acme/gap-tiny-sft-demo"
    pushed = push(hub, tmp_path, "--variant", TINY_VARIANT, "--checkpoint", str(output), "--repo-id", repo_id)
    assert pushed.returncode == 0, pushed.stdout[-2000:] + pushed.stderr[-3000:]
    sha = hub.repo(repo_id).branches["main"]
    assert f"published {repo_id} at {sha}" in pushed.stdout
    left_out = re.search(r"left out of the upload: (.*)", pushed.stdout).group(1).split(", ")
    assert {"checkpoint-4", "training_args.bin", "trainer_state.json"} <= set(left_out)
    files = hub.files(repo_id)
    assert {"README.md", "config.json", "model.safetensors", "modeling_gap.py", "processor_config.json"} <= set(files)
    assert not any(name.startswith("checkpoint-") or name.endswith(".bin") for name in files)
    assert files["model.safetensors"] == weights  # the trained weights
