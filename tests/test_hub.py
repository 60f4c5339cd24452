"""`trainers.hub` (`gap push`) and the variants in `hub_configs/`, against a local Hub (`tests/hub_server.py`).

Only the network service is stood in for: pushing and loading back run the real huggingface_hub, datasets,
transformers and peft code, in fresh processes with a fresh `HF_HOME` and `HF_ENDPOINT` pointing at the server.
"""

import glob
import json
import logging
import os
import sys

import datasets
import pytest
import torch
import yaml

from testing_utils import COLORS, HUB_TOKEN as TOKEN, OUTPUTS, ROOT, TINY_VARIANT as VARIANT, push, run_python as run
from testing_utils import solid_image
from trainers import hub as push_to_hub
from trainers.arguments import PushArguments


@pytest.fixture(scope="module")
def pushed_tiny(hub, tiny_checkpoint, tmp_path_factory):
    """The tiny GAP-PCA variant pushed to acme/gap-tiny-pca: (completed process, commit sha)."""
    result = push(hub, tmp_path_factory.mktemp("push"), "--variant", VARIANT, "--checkpoint", str(tiny_checkpoint),
                  "--repo-id", "acme/gap-tiny-pca")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, hub.repo("acme/gap-tiny-pca").branches["main"]


# ---- 1. a tiny variant: push, then load and generate in a fresh process ----------------------------------------------
MODEL_SCRIPT = r"""
import json, os, sys
import torch
from PIL import Image
from huggingface_hub import ModelCard
from transformers import AutoModelForImageTextToText, AutoProcessor

repo_id, revision, local, image_path = sys.argv[1:5]

def generate(source, revision=None):
    model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True, revision=revision).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True, revision=revision)
    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which corner is light?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image_path).convert("RGB")], text=[text], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False, max_latent_spans=1,
                             sequence_bias={(model.config.latent_start_token_id,): 100.0})
    return dict(tokens=ids[0, inputs["input_ids"].shape[1]:].tolist(), model=type(model).__name__,
                module=type(model).__module__, processor=type(processor).__name__,
                latent_start=model.config.latent_start_token_id)

card = ModelCard.load(repo_id)
snapshots = os.path.join(os.environ["HF_HOME"], "hub", "models--" + repo_id.replace("/", "--"), "snapshots")
print(json.dumps(dict(hub=generate(repo_id, revision), local=generate(local), card_data=card.data.to_dict(),
                      card_text=card.text, snapshots=sorted(os.listdir(snapshots)))))
"""


def test_pushed_tiny_variant_loads_in_a_fresh_process_and_generates_like_the_checkpoint(
        hub, tiny_checkpoint, pushed_tiny, tmp_path):
    result, sha = pushed_tiny
    assert f"published acme/gap-tiny-pca at {sha}" in result.stdout
    repo = hub.repo("acme/gap-tiny-pca")
    assert repo.private and len(repo.history()) == 2  # the repo's first commit, then exactly one commit
    files = hub.files("acme/gap-tiny-pca")
    assert set(files) == {".gitattributes", "README.md"} | set(os.listdir(tiny_checkpoint))
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)

    image = tmp_path / "image.png"
    solid_image(COLORS[2]).save(image)
    # Away from the repository: the model and processor code can only come from the downloaded remote code.
    loaded = run(hub, tmp_path / "hf_home_fresh",
                 ["-c", MODEL_SCRIPT, "acme/gap-tiny-pca", sha, str(tiny_checkpoint), str(image)], cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    info = json.loads(loaded.stdout.strip().splitlines()[-1])

    assert info["snapshots"] == [sha]  # downloaded into the fresh HF_HOME, at the pushed commit
    hub_run, local_run = info["hub"], info["local"]
    assert hub_run["model"] == "GapQwen2_5VLForConditionalGeneration"
    assert hub_run["module"].startswith("transformers_modules")
    assert hub_run["processor"] == "GapQwen2_5VLProcessor"
    assert hub_run["latent_start"] in hub_run["tokens"]  # a latent span was generated
    assert hub_run["tokens"] == local_run["tokens"]

    data = info["card_data"]
    assert data["base_model"] == "acme/tiny-random-qwen2.5-vl"
    assert data["pipeline_tag"] == "image-text-to-text" and data["library_name"] == "transformers"
    assert data["license"] == "apache-2.0" and data["datasets"] == ["acme/gap-tiny-synthetic"]
    assert {"gap", "custom_code"} <= set(data["tags"])
    text = info["card_text"]
    assert 'from_pretrained(repo_id, trust_remote_code=True, revision=revision)' in text
    assert "Pinning the revision" in text and "| K (latent tokens per span) | 4 |" in text
    assert f"revision={sha!r}" in result.stdout  # the pin is printed at publication


# ---- 2. a dataset: push, then load_dataset in a fresh process --------------------------------------------------------
def _schema_dataset(path, n=5):
    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "aux_images": datasets.List(datasets.Image()),
        "answer": datasets.Value("string"),
        "use_latent": datasets.Value("bool"),
        "base_pass_rate": datasets.Value("float32"),
    })
    spans = [2, 1, 0, 1, 0]
    rows = dict(
        images=[[solid_image(COLORS[i % 6])] for i in range(n)],
        messages=[[{"role": "user", "content": f"What colour is square {i}?"},
                   {"role": "assistant", "content": "Let me look. " + "<|latent|> " * spans[i] + f"Answer: {i}"}]
                  for i in range(n)],
        aux_images=[[solid_image(COLORS[(i + j + 1) % 6], size=84) for j in range(spans[i])] for i in range(n)],
        answer=[str(i) for i in range(n)],
        use_latent=[s > 0 for s in spans],
        base_pass_rate=[0.0, 0.25, 1.0, 0.5, 0.75],
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


DATASET_SCRIPT = r"""
import sys
import datasets
datasets.load_dataset(sys.argv[1], split="train").save_to_disk(sys.argv[2])
"""


def test_pushed_dataset_loads_back_with_its_images_and_a_card_that_states_the_schema(hub, tiny_checkpoint, tmp_path):
    original = _schema_dataset(tmp_path / "data")
    result = push(hub, tmp_path, "--variant", VARIANT, "--dataset", str(tmp_path / "data"), "--checkpoint",
                  str(tiny_checkpoint), "--repo-id", "acme/gap-tiny-with-data", "--dataset_repo_id", "acme/tiny-sft")
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repo("acme/tiny-sft", "dataset")
    assert result.stdout.index(f"published dataset acme/tiny-sft at {repo.branches['main']}") < \
        result.stdout.index("published acme/gap-tiny-with-data at")  # the data first, then the model naming it
    assert repo.private and [c.message for c in repo.history()][:2] == [
        "Dataset card: schema, latent span format, capacity statistics", "Upload the train split"]
    model_card = hub.files("acme/gap-tiny-with-data")["README.md"].decode()
    assert "datasets:\n- acme/gap-tiny-synthetic\n- acme/tiny-sft\n" in model_card

    loaded = run(hub, tmp_path / "hf_home_fresh", ["-c", DATASET_SCRIPT, "acme/tiny-sft", str(tmp_path / "back")],
                 cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    back = datasets.load_from_disk(str(tmp_path / "back"))
    assert back.features == original.features and back.num_rows == original.num_rows
    for got, want in zip(back, original):
        for column in ("messages", "answer", "use_latent", "base_pass_rate"):
            assert got[column] == want[column]
        for column in ("images", "aux_images"):
            assert [im.tobytes() for im in got[column]] == [im.tobytes() for im in want[column]]
            assert [im.size for im in got[column]] == [im.size for im in want[column]]

    card = hub.files("acme/tiny-sft", "dataset")["README.md"].decode()
    from huggingface_hub import DatasetCard

    parsed = DatasetCard(card)
    assert parsed.data.license == "apache-2.0" and parsed.data.task_categories == ["image-text-to-text"]
    assert parsed.data.dataset_info["splits"][0]["num_examples"] == 5  # datasets' own metadata is kept
    for column in ("images", "messages", "aux_images", "answer", "use_latent", "base_pass_rate"):
        assert f"| `{column}` |" in card
    assert "<|latent_start|>` + K x `<|latent_pad|>` + `<|latent_end|>" in card
    assert "| train | 5 | 4 | 3 | 4 |" in card  # rows, markers, rows with a marker, aux images
    assert "| train | 3 | 2 | 0.500 | 0.000 | 0.500 | 1.000 |" in card  # use_latent counts, base_pass_rate


# ---- 3. failures and the token --------------------------------------------------------------------------------------
@pytest.mark.parametrize("route,status", [("commit", 500), ("lfs_put", 507)])
def test_a_server_error_mid_upload_exits_nonzero_and_publishes_nothing(hub, tiny_checkpoint, tmp_path, route,
                                                                       status):
    repo_id = f"acme/fails-on-{route.replace('_', '-')}"
    args = ["--variant", VARIANT, "--checkpoint", str(tiny_checkpoint), "--repo-id", repo_id]
    hub.fail(route, status)
    try:
        result = push(hub, tmp_path, *args)
    finally:
        hub.fail(route, None)
    assert result.returncode != 0
    assert f"error: push to {repo_id} failed at step 'upload the files and commit'" in result.stderr
    assert str(status) in result.stderr
    assert "published" not in (result.stdout + result.stderr).replace("Nothing was published", "")
    assert "Nothing was published: 'main' is still at" in result.stderr
    first = hub.repo(repo_id).history()
    assert [c.message for c in first] == ["initial commit"]  # created, but no commit of ours

    healed = push(hub, tmp_path, *args)  # the same push once the server is healthy: one commit on top
    assert healed.returncode == 0, healed.stderr[-3000:]
    history = hub.repo(repo_id).history()
    assert len(history) == 2 and history[0].parent == first[0].sha


def test_local_problems_stop_the_push_before_any_request(hub, tiny_checkpoint, tmp_path):
    import shutil

    def main(**kwargs):
        before = len(hub.requests)
        with pytest.raises(push_to_hub.PushError) as err:
            push_to_hub.push(PushArguments(repo_id="acme/never", token=TOKEN, **kwargs))
        assert len(hub.requests) == before and ("model", "acme/never") not in hub.repos
        assert TOKEN not in str(err.value)
        return str(err.value)

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, pickled)
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    message = main(variant=VARIANT, checkpoint=str(pickled))
    assert "step 'check the checkpoint'" in message and "pytorch_model.bin" in message and "safetensors" in message

    ema_variant = os.path.join(ROOT, "hub_configs", "gap-qwen2.5-vl-tiny-ema-norm.yaml")
    assert "latent_feedback='ema_norm'" in main(variant=ema_variant, checkpoint=str(tiny_checkpoint))

    leaky = tmp_path / "leaky"
    shutil.copytree(tiny_checkpoint, leaky)
    (leaky / "notes.json").write_text(json.dumps({"hub_token": TOKEN}))
    assert "notes.json contains the Hub token" in main(variant=VARIANT, checkpoint=str(leaky))

    data = tmp_path / "data"
    _schema_dataset(data)
    broken = datasets.load_from_disk(str(data)).map(lambda row, i: {"aux_images": [] if i == 1 else row["aux_images"]},
                                                    with_indices=True)
    broken.save_to_disk(str(tmp_path / "broken"))
    message = main(variant=VARIANT, dataset=str(tmp_path / "broken"))
    assert "step 'check the dataset'" in message and "row 1: 1 <|latent|> marker(s) but 0 aux image(s)" in message

    # Trainer leftovers are left out, not refused.
    trained = tmp_path / "trained"
    shutil.copytree(tiny_checkpoint, trained)
    torch.save({}, trained / "training_args.bin")
    (trained / "trainer_state.json").write_text("{}")
    publish, left_out = push_to_hub.checkpoint_files(str(trained), push_to_hub.HubVariant.from_file(VARIANT))
    assert left_out == ["trainer_state.json", "training_args.bin"] and "model.safetensors" in publish


@pytest.mark.parametrize("where", ["results", "variant card", "dataset column"])
def test_a_token_in_the_results_the_card_text_or_the_data_stops_the_push_before_any_request(
        hub, tiny_checkpoint, tmp_path, where):
    """The model card embeds `--results` and the variant's text; the dataset's strings are uploaded as they are:
    each is checked for the token before anything is sent."""
    args = ["--variant", VARIANT, "--checkpoint", str(tiny_checkpoint), "--repo-id", f"acme/leak-{where.split()[-1]}"]
    if where == "results":
        (tmp_path / "results.json").write_text(json.dumps({"bench": {"note": f"run with {TOKEN}"}}))
        args += ["--results", str(tmp_path / "results.json")]
    elif where == "variant card":
        with open(VARIANT) as f:
            raw = yaml.safe_load(f)
        raw["card"]["limitations"] += f" Contact us with token {TOKEN}."
        (tmp_path / "variant.yaml").write_text(yaml.safe_dump(raw))
        args[1] = str(tmp_path / "variant.yaml")
    else:
        _schema_dataset(tmp_path / "data")
        leaky = datasets.load_from_disk(str(tmp_path / "data")).map(
            lambda row, i: {"answer": f"{row['answer']} {TOKEN}" if i == 2 else row["answer"]}, with_indices=True)
        leaky.save_to_disk(str(tmp_path / "leaky"))
        args += ["--dataset", str(tmp_path / "leaky")]
    before = len(hub.requests)
    result = push(hub, tmp_path, *args)
    assert result.returncode != 0 and "contains the Hub token" in result.stderr, result.stderr[-2000:]
    assert TOKEN not in result.stdout + result.stderr
    # Only the local checks ran: no request carried anything (reading nothing either).
    assert len(hub.requests) == before


def test_masked_output_hides_the_token_from_prints_logs_and_warnings(capsys):
    import warnings

    logger = logging.getLogger("huggingface_hub.test_push")
    with push_to_hub.masked_output(TOKEN):
        print(f"token={TOKEN}")
        print(f"token={TOKEN}", file=sys.stderr)
        logger.warning("token=%s", TOKEN)
        warnings.warn(f"token={TOKEN}")
    out, err = capsys.readouterr()
    assert TOKEN not in out + err and "token=hf_***" in out and err.count("token=hf_***") >= 2
    assert push_to_hub.mask(f"a {TOKEN} b", TOKEN) == "a hf_*** b"


# ---- a LoRA adapter: push it and its base, load with PeftModel in a fresh process ------------------------------------
LORA_SCRIPT = r"""
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

base_id, adapter_id, batch_path = sys.argv[1:4]
base = AutoModelForImageTextToText.from_pretrained(base_id, trust_remote_code=True)
model = PeftModel.from_pretrained(base, adapter_id).eval()
with torch.no_grad():
    torch.save(model(**torch.load(batch_path, weights_only=True)).logits, batch_path + ".out")
"""


def test_lora_adapter_and_its_base_round_trip_through_peft(hub, tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from testing_utils import chat

    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                        modules_to_save=["latent_head"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))

    init = os.path.join(ROOT, "hub_configs", "gap-qwen2.5-vl-tiny-pca-init.yaml")
    lora = os.path.join(ROOT, "hub_configs", "gap-qwen2.5-vl-tiny-pca-lora.yaml")
    for variant, checkpoint, repo_id in ((init, tiny_checkpoint, "acme/gap-qwen2.5-vl-tiny-pca-init"),
                                         (lora, tmp_path / "adapter", "acme/gap-tiny-pca-lora")):
        result = push(hub, tmp_path, "--variant", variant, "--checkpoint", str(checkpoint), "--repo-id", repo_id)
        assert result.returncode == 0, result.stderr[-3000:]
    files = hub.files("acme/gap-tiny-pca-lora")
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
    card = files["README.md"].decode()
    assert "base_model: acme/gap-qwen2.5-vl-tiny-pca-init" in card and "library_name: peft" in card
    assert "PeftModel.from_pretrained(base, adapter_id, revision=revision)" in card

    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    batch = dict(processor(images=[solid_image(COLORS[0])], text=[chat(processor, "What colour?")],
                           return_tensors="pt"))
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).logits
    loaded = run(hub, tmp_path / "hf_home_fresh", ["-c", LORA_SCRIPT, "acme/gap-qwen2.5-vl-tiny-pca-init",
                                                   "acme/gap-tiny-pca-lora", str(tmp_path / "batch.pt")],
                 cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert torch.allclose(torch.load(str(tmp_path / "batch.pt.out"), weights_only=True), expected, atol=1e-5)


def test_measured_figures_from_the_variant_and_a_results_file_fill_the_card(tiny_checkpoint, tmp_path):
    from huggingface_hub import ModelCard

    variant = push_to_hub.HubVariant.from_file(VARIANT)
    variant.results = {"synthetic accuracy": 0.8125}
    (tmp_path / "results.json").write_text(json.dumps({"vstar": {"accuracy": 0.5, "n": 191}}))
    results = push_to_hub.read_results(variant, str(tmp_path / "results.json"))
    assert results == [("synthetic accuracy", "0.8125"), ("vstar / accuracy", "0.5"), ("vstar / n", "191")]
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    card = ModelCard(str(push_to_hub.model_card(variant.for_org("acme"), "acme/x", config, results, [], [])))
    assert "| vstar / accuracy | 0.5 |" in card.text and card.data.pipeline_tag == "image-text-to-text"
    # The requirement the remote code checks, with the command it names below the range (one source).
    assert 'pip install "transformers>=5.19,<5.40"' in card.text


# ---- variants -------------------------------------------------------------------------------------------------------
def test_every_hub_config_loads_and_validates():
    paths = sorted(glob.glob(os.path.join(ROOT, "hub_configs", "*.yaml")))
    variants = [push_to_hub.HubVariant.from_file(p) for p in paths]
    assert len(variants) >= 8
    for path, variant in zip(paths, variants):
        assert os.path.basename(path) == f"{variant.name}.yaml"
    kinds = {(v.name.split("-")[3], v.kind, v.latent_feedback) for v in variants}  # gap-qwen2.5-vl-SIZE-...
    for size in ("7b", "tiny"):
        for kind, feedback in (("full", "pca"), ("full", "ema_norm"), ("full", "raw"), ("lora", "pca")):
            assert (size, kind, feedback) in kinds, (size, kind, feedback)
    names = {v.name for v in variants}
    for variant in variants:  # an adapter's base is a published variant too
        if variant.kind == "lora":
            assert variant.for_org("acme").base_model.split("/")[1] in names


@pytest.mark.parametrize("change,field", [
    (lambda v: v.pop("base_model"), "base_model"),
    (lambda v: v.update(latent_feedback="linear"), "latent_feedback"),
    (lambda v: v.update(num_latent_tokens=0), "num_latent_tokens"),
    (lambda v: v.update(latent_pca_rank="256"), "latent_pca_rank"),
    (lambda v: v.update(kind="merged"), "kind"),
    (lambda v: v.update(tags="gap"), "tags"),
    (lambda v: v.update(base_model="Qwen2.5-VL-7B"), "base_model"),
    (lambda v: v["card"].update(title=""), "card.title"),
    (lambda v: v["card"].pop("limitations"), "card.limitations"),
    (lambda v: v.update(lisence="mit"), "lisence"),
    (lambda v: v.update(results={"acc": True}), "results"),
])
def test_a_bad_variant_file_names_the_field(tmp_path, change, field):
    with open(VARIANT) as f:
        raw = yaml.safe_load(f)
    change(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(push_to_hub.VariantError, match=f"'{field}'"):
        push_to_hub.HubVariant.from_file(str(path))


# ---- the token, everywhere (runs last: scans what the tests above sent, stored and printed) --------------------------
def test_the_token_is_in_no_upload_request_body_stored_file_or_output(hub, pushed_tiny, tiny_checkpoint, tmp_path):
    # One more push with the token on the command line instead of the environment.
    result = push(hub, tmp_path, "--variant", VARIANT, "--checkpoint", str(tiny_checkpoint),
                  "--repo-id", "acme/token-on-argv", "--token", TOKEN, "--public", token_in_env=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not hub.repo("acme/token-on-argv").private and "(public, " in result.stdout
    secret = TOKEN.encode()
    assert hub.requests and all(secret not in r.body for r in hub.requests)
    for r in hub.requests:  # only ever in the Authorization header
        assert all(TOKEN not in value for key, value in r.headers.items() if key != "authorization")
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    for repo in hub.repos.values():
        for commit in repo.commits.values():
            assert all(secret not in blob.content for blob in commit.files.values()), repo.repo_id
            assert TOKEN not in commit.message
        assert all(secret not in content for content in repo.lfs_objects.values()), repo.repo_id
    assert len(OUTPUTS) >= 3 and all(TOKEN not in output for output in OUTPUTS)
