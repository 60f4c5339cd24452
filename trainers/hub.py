"""Publish a GAP variant to the Hub in one commit: weights, remote code, processor, generation config, model card.

    HF_TOKEN=hf_... gap push --variant hub_configs/gap-qwen2.5-vl-7b-pca.yaml \\
        --checkpoint outputs/gap-7b-pca --repo-id ORG/gap-qwen2.5-vl-7b-pca [--dataset data/gap-sft] [--public]

`--space ORG/NAME` also publishes the model's latent inspector (`trainers.space`, a Gradio app) as a Space, in one
commit after the model's: `app.py` (loads the model at the commit just made), `requirements.txt` (this package,
pinned, with its `[space]` extra; `--space_requirement` for another source such as a pinned git URL), a README with
the Space card (`sdk: gradio`, `sdk_version`, `app_file`, `models:`) and example images; the model card links it.
Without `--checkpoint` the Space is published for the model repo's current head. The Space's commit goes to its
`main` branch (the one a Space serves); a private model needs a read token as the Space's secret `HF_TOKEN` (printed).

`--variant` is a file in `hub_configs/` (see `HubVariant`): what the card says about the model. `--checkpoint` is a
GAP checkpoint directory (`save_pretrained` of the model and the processor) or, for a `kind: lora` variant, a PEFT
adapter directory. `--dataset DIR` also pushes a training dataset saved with `datasets.save_to_disk`
(`Dataset.push_to_hub`, then its `DatasetCard`) to the dataset repo `--dataset_repo_id` (default: `--repo-id`); the
checkpoint may then be left out. `--results FILE.json` adds measured figures to the card.

Decisions, so that a published repo can be trusted:
- Safetensors only. Every top-level file of the checkpoint is published except README.md (the card is written here),
  hidden files and the trainer's own state (optimizer, scheduler, RNG, training args); any other pickle (`.bin`,
  `.pt`, `.pth`, `.pkl`, `.ckpt`) stops the push before anything is sent.
- The checkpoint must be what the variant says: its config.json's K, feedback mode, PCA rank, preset and span rule
  must equal the variant's, and the remote code named in `auto_map` must be there.
- Private unless `--public`. An existing repo keeps its visibility.
- One commit, made on top of the head read before uploading (`parent_commit`): if the branch moved meanwhile, the
  commit is refused. A card cannot hold the sha of the commit that adds it, so the card tells readers to pin
  `revision=` to this commit's sha and lists the sha256 of each code file to check a pinned revision against; the
  script prints the sha, with a ready-to-paste `from_pretrained(..., revision=...)` line.
- The token (`--token`, else `HF_TOKEN` / the saved login) is never written to a file, a card or the output: every
  text file to be uploaded is checked for it, and stdout, stderr and logging are masked while the script runs.
- A failure (local check or server error) exits non-zero with `error: push to REPO failed at step '...'`; "published"
  is printed only after the commit returned. A dataset push is two commits (data, then card); the data commit's sha
  is named if the card commit fails.
"""

import hashlib
import io
import json
import logging
import os
import re
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, replace

import yaml

from modeling_gap.configuration_gap import LATENT_FEEDBACK_MODES, LATENT_MARKER, LATENT_PRESETS, LATENT_SPAN_RULES

from .arguments import PushArguments
from .schema import count_markers

KINDS = ("full", "lora")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What a Trainer writes beside the model: never part of a published checkpoint, never uploaded.
TRAINER_STATE_FILES = re.compile(
    r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|trainer_state\.json)$")
# Variant fields that must equal the checkpoint's config.json (full-weight variants).
CONFIG_FIELDS = ("num_latent_tokens", "latent_feedback", "latent_pca_rank", "latent_preset", "latent_span_rule")


class VariantError(ValueError):
    """A variant file that does not validate; the message names the file and the field."""


class PushError(RuntimeError):
    """A push that stopped; the message names the repo and the step."""


# ---- variants --------------------------------------------------------------------------------------------------------
@dataclass
class CardText:
    title: str
    summary: str
    intended_use: str
    limitations: str


@dataclass
class HubVariant:
    """One published variant, as written in `hub_configs/<name>.yaml`.

    `{org}` in `base_model` and `datasets` is replaced by the organisation of `--repo-id` at push time. For a `lora`
    variant, `base_model` is the GAP checkpoint (with its remote code) that the adapter is loaded onto."""

    name: str
    kind: str
    base_model: str
    latent_feedback: str
    num_latent_tokens: int
    latent_pca_rank: int
    license: str
    tags: list[str]
    datasets: list[str]
    card: CardText
    latent_preset: str = "gap"
    latent_span_rule: str = "fixed"
    language: list[str] = field(default_factory=lambda: ["en"])
    results: dict[str, float | int | str] = field(default_factory=dict)
    # The recipe files (`recipes/<model>/<stage>/config_<variant>.yaml`, from the repository root) that make this
    # variant, stage by stage, in order.
    recipes: list[str] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str) -> "HubVariant":
        with open(path) as f:
            raw = yaml.safe_load(f)
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw, source: str = "variant") -> "HubVariant":
        def fail(name, expected, value):
            raise VariantError(f"{source}: field '{name}' must be {expected}; got {value!r}.")

        if not isinstance(raw, dict):
            raise VariantError(f"{source}: a variant file is a YAML mapping of fields; got {type(raw).__name__}.")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(raw) - known):
            raise VariantError(f"{source}: unknown field '{unknown[0]}' (fields: {', '.join(sorted(known))}).")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        if missing := [name for name in required if name not in raw]:
            raise VariantError(f"{source}: missing field '{missing[0]}'.")
        values = dict(raw)
        for name in ("name", "base_model", "license", "latent_preset", "latent_span_rule"):
            if name in values and not (isinstance(values[name], str) and values[name].strip()):
                fail(name, "a non-empty string", values[name])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", values["name"]):
            fail("name", "a repo name (letters, digits, '.', '_', '-')", values["name"])
        if not re.fullmatch(r"[^/\s]+/[^/\s]+", values["base_model"]):
            fail("base_model", "a Hub repo id 'org/name'", values["base_model"])
        for name, allowed in (("kind", KINDS), ("latent_feedback", LATENT_FEEDBACK_MODES),
                              ("latent_preset", tuple(LATENT_PRESETS)), ("latent_span_rule", LATENT_SPAN_RULES)):
            if name in values and values[name] not in allowed:
                fail(name, f"one of {allowed}", values[name])
        for name in ("num_latent_tokens", "latent_pca_rank"):
            value = values[name]
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                fail(name, "an integer >= 1", value)
        for name in ("tags", "datasets", "language", "recipes"):
            value = values.get(name, [])
            if not (isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)):
                fail(name, "a list of non-empty strings", value)
        results = values.get("results", {})
        if not (isinstance(results, dict) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool)
                                                  for v in results.values())):
            fail("results", "a mapping of name -> number or string", results)
        card = values["card"]
        if not isinstance(card, dict):
            fail("card", "a mapping with title, summary, intended_use, limitations", card)
        for card_field in fields(CardText):
            if not (isinstance(card.get(card_field.name), str) and card[card_field.name].strip()):
                fail(f"card.{card_field.name}", "a non-empty string", card.get(card_field.name))
        if unknown := sorted(set(card) - {f.name for f in fields(CardText)}):
            raise VariantError(f"{source}: unknown field 'card.{unknown[0]}'.")
        values["card"] = CardText(**{k: card[k].strip() for k in card})
        return cls(**values)

    def for_org(self, org: str) -> "HubVariant":
        """The variant with `{org}` filled in."""
        return replace(self, base_model=self.base_model.replace("{org}", org),
                       datasets=[d.replace("{org}", org) for d in self.datasets])


# ---- token masking ---------------------------------------------------------------------------------------------------
def mask(text: str, secret: str | None) -> str:
    return text.replace(secret, "hf_***") if secret else text


class _MaskedStream(io.TextIOBase):
    def __init__(self, stream, secret: str):
        self.stream, self.secret = stream, secret

    def write(self, text):
        return self.stream.write(mask(text, self.secret))

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


class _MaskFilter(logging.Filter):
    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record):
        record.msg, record.args = mask(record.getMessage(), self.secret), ()
        return True


@contextmanager
def masked_output(secret: str | None):
    """While inside: the secret never reaches stdout, stderr, a logging handler or a printed warning."""
    if not secret:
        yield
        return
    real = sys.stdout, sys.stderr, warnings.showwarning
    sys.stdout, sys.stderr = _MaskedStream(real[0], secret), _MaskedStream(real[1], secret)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        (file or sys.stderr).write(mask(text, secret))

    warnings.showwarning = showwarning
    log_filter = _MaskFilter(secret)
    handlers = {h for name in (None, "huggingface_hub", "datasets", "transformers", "peft")
                for h in logging.getLogger(name).handlers}
    for handler in handlers:
        handler.addFilter(log_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)
        sys.stdout, sys.stderr, warnings.showwarning = real


def describe(err: BaseException) -> str:
    """One line per error of the chain (huggingface_hub wraps HTTP errors), down to the first HTTP error."""
    lines = []
    while err is not None and len(lines) < 4:
        lines.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if getattr(err, "response", None) is not None:  # an HfHubHTTPError: the server's own words, then stop
            if server_message := getattr(err, "server_message", None):
                lines[-1] += f" (server: {server_message.strip()})"
            break
        err = err.__cause__
    return " <- ".join(lines)


@contextmanager
def step(repo_id: str, name: str, secret: str | None, note: str = ""):
    """Turn any failure inside into a PushError naming the repo and the step (token masked)."""
    try:
        yield
    except PushError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure is reported the same way
        raise PushError(mask(f"push to {repo_id} failed at step '{name}': {describe(err)}{note}", secret)) from err


def resolve_token(args: PushArguments) -> str | None:
    from huggingface_hub import get_token

    return args.token or get_token()


# ---- the checkpoint --------------------------------------------------------------------------------------------------
def checkpoint_files(checkpoint: str, variant: HubVariant) -> tuple[list[str], list[str]]:
    """(files to publish, files left out) of a checkpoint directory; raises on pickles or missing pieces."""
    if not os.path.isdir(checkpoint):
        raise ValueError(f"{checkpoint} is not a directory")
    names = sorted(os.listdir(checkpoint))
    left_out = [n for n in names if n.startswith(".") or n == "README.md" or TRAINER_STATE_FILES.match(n)
                or not os.path.isfile(os.path.join(checkpoint, n))]
    publish = [n for n in names if n not in left_out]
    if pickles := [n for n in publish if n.lower().endswith(PICKLE_SUFFIXES)]:
        raise ValueError(f"{checkpoint} holds pickled files {pickles}: only safetensors are published. Re-save the "
                         "weights with save_pretrained (safetensors is its default) and remove the pickles.")
    if variant.kind == "lora":
        needed = ["adapter_config.json", "adapter_model.safetensors"]
    else:
        needed = ["config.json", "generation_config.json", "tokenizer_config.json"]
        if not any(re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", n) for n in publish):
            needed.append("model.safetensors")
        if not {"processor_config.json", "preprocessor_config.json"} & set(publish):
            needed.append("processor_config.json")
    if missing := [n for n in needed if n not in publish]:
        raise ValueError(f"{checkpoint} has no {missing[0]} (a {variant.kind} variant needs {needed})")
    return publish, left_out


def check_config(checkpoint: str, variant: HubVariant, publish: list[str]) -> dict:
    """The checkpoint's config.json (or adapter_config.json), checked against the variant."""
    if variant.kind == "lora":
        with open(os.path.join(checkpoint, "adapter_config.json")) as f:
            config = json.load(f)
        if variant.latent_feedback == "pca" and "latent_head" not in (config.get("modules_to_save") or []):
            print("note: the adapter does not save the latent head (modules_to_save); it uses the base's head")
        return config
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    for name in CONFIG_FIELDS:
        if config.get(name) != getattr(variant, name):
            raise ValueError(f"the variant says {name}={getattr(variant, name)!r} but {checkpoint}/config.json has "
                             f"{config.get(name)!r}: push the checkpoint that matches the variant")
    code = sorted({ref.split(".")[0] + ".py" for ref in (config.get("auto_map") or {}).values()})
    if not code:
        raise ValueError(f"{checkpoint}/config.json has no auto_map: save the model with its remote code")
    if missing := [c for c in code if c not in publish]:
        raise ValueError(f"{checkpoint} lacks the remote code file {missing[0]} named in config.json auto_map")
    return config


def check_no_secret(checkpoint: str, publish: list[str], secret: str | None):
    """Refuse to upload a text file that contains the token (weights are not scanned)."""
    if not secret:
        return
    for name in publish:
        if name.endswith(".safetensors"):
            continue
        with open(os.path.join(checkpoint, name), "rb") as f:
            if secret.encode() in f.read():
                raise ValueError(f"{checkpoint}/{name} contains the Hub token; refusing to upload it")


def check_text_for_secret(text: str, secret: str | None, what: str):
    """Refuse to upload `text` (a card, a dataset's strings) when it contains the token."""
    if secret and secret in text:
        raise ValueError(f"{what} contains the Hub token; refusing to upload it (remove the token from it)")


def check_dataset_for_secret(splits: dict, secret: str | None):
    """Every string of every split (messages, answers, any text column) is checked for the token, through Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not secret:
        return

    def strings(array):
        kind = array.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            yield array
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            yield from strings(array.flatten())
        elif pa.types.is_struct(kind):
            for i in range(kind.num_fields):
                yield from strings(array.field(i))

    for name, split in splits.items():
        table = split.with_format("arrow")[:] if split.num_rows else None
        if table is None:
            continue
        for column in table.column_names:  # image columns: their paths are checked, their bytes are not text
            for chunk in table.column(column).chunks:
                for array in strings(chunk):
                    if pc.any(pc.match_substring(array, secret)).as_py():
                        raise ValueError(f"split '{name}' column '{column}' contains the Hub token; refusing to "
                                         "upload the dataset (remove the token from the data)")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- cards -----------------------------------------------------------------------------------------------------------
def card_template(name: str) -> str:
    """A card template shipped with the package (`trainers/templates/<name>.md`, Jinja, as huggingface_hub reads)."""
    from importlib.resources import files

    return files("trainers").joinpath("templates", f"{name}.md").read_text(encoding="utf-8")


def read_results(variant: HubVariant, results_path: str | None) -> list[tuple[str, str]]:
    """The variant's figures, then the --results file's (flattened: {"bench": {"acc": 0.5}} -> "bench / acc")."""
    results = dict(variant.results)
    if results_path:
        with open(results_path) as f:
            loaded = json.load(f)

        def flatten(prefix, value):
            if isinstance(value, dict):
                for key, inner in value.items():
                    yield from flatten(f"{prefix} / {key}" if prefix else str(key), inner)
            elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
                yield prefix, value

        if not isinstance(loaded, dict):
            raise ValueError(f"{results_path} must hold a JSON object of figures")
        results.update(flatten("", loaded))
    return [(name, f"{value:.4g}" if isinstance(value, float) else str(value)) for name, value in results.items()]


def model_card(variant: HubVariant, repo_id: str, config: dict, results, files, datasets: list[str],
               space_repo_id: str | None = None):
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        base_model=variant.base_model, pipeline_tag="image-text-to-text",
        library_name="peft" if variant.kind == "lora" else "transformers", license=variant.license,
        language=variant.language or None, tags=variant.tags, datasets=datasets or None,
    )
    if variant.kind == "lora":
        settings = [("kind", "LoRA adapter"), ("base model (GAP checkpoint)", f"`{variant.base_model}`"),
                    ("LoRA r / alpha", f"{config.get('r')} / {config.get('lora_alpha')}"),
                    ("target modules", f"`{config.get('target_modules')}`"),
                    ("modules saved whole", f"`{config.get('modules_to_save')}`")]
    else:
        settings = [("kind", "full weights"), ("base model", f"`{variant.base_model}`")]
    settings += [("latent feedback", f"`{variant.latent_feedback}`"), ("K (latent tokens per span)",
                 variant.num_latent_tokens), ("PCA rank r", variant.latent_pca_rank),
                 ("latent preset", f"`{variant.latent_preset}`"), ("span rule", f"`{variant.latent_span_rule}`")]
    return ModelCard.from_template(
        card_data, template_str=card_template("model_card"), title=variant.card.title, summary=variant.card.summary,
        intended_use=variant.card.intended_use, limitations=variant.card.limitations, kind=variant.kind,
        repo_id=repo_id, settings=settings, results=results, files=files, datasets=datasets,
        space_repo_id=space_repo_id,
    )


def dataset_statistics(split_name: str, split) -> tuple[dict, dict | None]:
    """Marker / aux-image counts (checking one aux image per marker, naming the row) and capacity statistics."""
    import statistics

    for column in ("images", "messages", "aux_images", "answer"):
        if column not in split.column_names:
            raise ValueError(f"split '{split_name}' has no '{column}' column (columns: {split.column_names})")
    stats = dict(split=split_name, rows=split.num_rows, markers=0, rows_with_marker=0, aux_images=0)
    columns = ["messages", "aux_images"] + [c for c in ("use_latent", "base_pass_rate") if c in split.column_names]
    use_latent, pass_rates, index = [], [], 0
    for batch in split.select_columns(columns).with_format("arrow").iter(batch_size=512):
        messages = batch.column("messages").to_pylist()
        aux = [len(a or []) for a in batch.column("aux_images").to_pylist()] if batch.num_rows else []
        for row_messages, n_aux in zip(messages, aux):
            markers = count_markers(row_messages)
            if markers != n_aux:
                raise ValueError(f"split '{split_name}' row {index}: {markers} {LATENT_MARKER} marker(s) but "
                                 f"{n_aux} aux image(s); GAP's schema needs one aux image per marker")
            stats["markers"] += markers
            stats["rows_with_marker"] += markers > 0
            stats["aux_images"] += n_aux
            index += 1
        if "use_latent" in columns:
            use_latent += batch.column("use_latent").to_pylist()
        if "base_pass_rate" in columns:
            pass_rates += [r for r in batch.column("base_pass_rate").to_pylist() if r is not None]
    if "use_latent" not in columns and "base_pass_rate" not in columns:
        return stats, None
    capacity = dict(split=split_name, use_latent_true=sum(v is True for v in use_latent) if use_latent else "-",
                    use_latent_false=sum(v is False for v in use_latent) if use_latent else "-")
    for key, fn in (("pass_mean", statistics.fmean), ("pass_min", min), ("pass_median", statistics.median),
                    ("pass_max", max)):
        capacity[key] = f"{fn(pass_rates):.3f}" if pass_rates else "-"
    return stats, capacity


def describe_splits(splits: dict) -> dict:
    """Schema and per-split statistics of a dataset (one pass over its text columns; raises on a bad row)."""
    stats, capacity = zip(*(dataset_statistics(name, split) for name, split in splits.items()))
    first = next(iter(splits.values()))
    return dict(schema=[(name, repr(feature)) for name, feature in first.features.items()], splits=list(stats),
                capacity=[c for c in capacity if c])


def dataset_card(variant: HubVariant, repo_id: str, model_repo_id: str, described: dict, existing=None):
    """The DatasetCard: our metadata and text on top of the metadata `Dataset.push_to_hub` wrote (kept)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    metadata = existing.data.to_dict() if existing is not None else {}
    metadata.update(license=variant.license, task_categories=["image-text-to-text"],
                    pretty_name=f"{variant.card.title}: training data",
                    tags=sorted(set(metadata.get("tags") or []) | {"gap", "visual-latent-reasoning"}))
    return DatasetCard.from_template(
        DatasetCardData(**metadata), template_str=card_template("dataset_card"), title=f"{variant.card.title}: training data",
        summary=variant.card.summary, repo_id=repo_id, model_repo_id=model_repo_id, license=variant.license,
        **described,
    )


# ---- pushing ---------------------------------------------------------------------------------------------------------
@dataclass
class ModelUpload:
    """A checked checkpoint, ready to commit."""

    publish: list[str]
    left_out: list[str]
    card: object


def prepare_model(args: PushArguments, variant: HubVariant, token: str, datasets: list[str]) -> ModelUpload:
    with step(args.repo_id, "check the checkpoint", token):
        checkpoint = args.checkpoint
        publish, left_out = checkpoint_files(checkpoint, variant)
        config = check_config(checkpoint, variant, publish)
        check_no_secret(checkpoint, publish, token)
        results = read_results(variant, args.results)
        files = [(n, os.path.getsize(os.path.join(checkpoint, n)),
                  "(LFS, on the Hub)" if n.endswith(".safetensors") else sha256_file(os.path.join(checkpoint, n)))
                 for n in publish]
        card = model_card(variant, args.repo_id, config, results, files, datasets, space_repo_id=args.space)
        check_text_for_secret(str(card), token, "the generated model card (from the variant and --results)")
    return ModelUpload(publish, left_out, card)


def prepare_dataset(args: PushArguments, variant: HubVariant, repo_id: str, token: str) -> tuple[dict, dict]:
    import datasets

    with step(repo_id, "check the dataset", token):
        loaded = datasets.load_from_disk(args.dataset)
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        described = describe_splits(splits)
        check_dataset_for_secret(splits, token)
        card = dataset_card(variant, repo_id, args.repo_id, described)
        check_text_for_secret(str(card), token, "the generated dataset card")
        return splits, described


def push_dataset(args: PushArguments, variant: HubVariant, token: str, repo_id: str, splits: dict,
                 described: dict) -> dict:
    from huggingface_hub import DatasetCard, HfApi, hf_hub_download

    with step(repo_id, "upload the dataset", token):
        for name, split in splits.items():
            info = split.push_to_hub(repo_id, split=name, private=not args.public, token=token,
                                     revision=None if args.revision == "main" else args.revision,
                                     commit_message=f"Upload the {name} split")
    with step(repo_id, f"write the dataset card (the data is committed at {info.oid})", token):
        written = DatasetCard.load(hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=info.oid,
                                                   token=token))
        card = dataset_card(variant, repo_id, args.repo_id, described, existing=written)
        commit = HfApi(token=token).upload_file(
            path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset",
            revision=args.revision, parent_commit=info.oid,
            commit_message="Dataset card: schema, latent span format, capacity statistics")
    print(f"published dataset {repo_id} at {commit.oid}")
    return dict(dataset_repo_id=repo_id, dataset_sha=commit.oid)


def push_model(args: PushArguments, variant: HubVariant, token: str, upload: ModelUpload) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi

    repo_id = args.repo_id
    if upload.left_out:
        print(f"left out of the upload: {', '.join(upload.left_out)}")
    api = HfApi(token=token)
    with step(repo_id, "create the repo", token):
        api.create_repo(repo_id, private=not args.public, exist_ok=True)
    with step(repo_id, f"read the head of '{args.revision}'", token):
        head = api.model_info(repo_id, revision=args.revision)
    operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=os.path.join(args.checkpoint, n))
                  for n in upload.publish]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(upload.card).encode()))
    message = args.commit_message or (f"Publish {variant.name}: GAP {variant.kind}, {variant.latent_feedback} "
                                      f"feedback, K={variant.num_latent_tokens}")
    with step(repo_id, "upload the files and commit", token,
              note=f". Nothing was published: '{args.revision}' is still at {head.sha}."):
        commit = api.create_commit(repo_id, operations=operations, commit_message=message, revision=args.revision,
                                   parent_commit=head.sha)
    visibility = "private" if head.private else "public"
    print(f"published {repo_id} at {commit.oid} ({visibility}, {len(operations)} files, one commit)")
    print(f"  pin it: from_pretrained({repo_id!r}, trust_remote_code=True, revision={commit.oid!r})")
    return dict(repo_id=repo_id, sha=commit.oid, parent=head.sha, files=[op.path_in_repo for op in operations])


def push(args: PushArguments) -> dict:
    """Check everything that can be checked locally, then push the dataset (if any), then the model (if any).
    Raises `PushError` naming the repo and the step."""
    if not args.variant or not args.repo_id:
        raise PushError("--variant and --repo-id are required.")
    if not re.fullmatch(r"[^/\s]+/[^/\s]+", args.repo_id):
        raise PushError(f"--repo-id must be ORG/NAME; got {args.repo_id!r}.")
    if not args.checkpoint and not args.dataset and not args.space:
        raise PushError("nothing to push: give --checkpoint, --dataset and/or --space.")
    if args.space and not re.fullmatch(r"[^/\s]+/[^/\s]+", args.space):
        raise PushError(f"--space must be ORG/NAME; got {args.space!r}.")
    token = resolve_token(args)
    with step(args.repo_id, "read the variant", token):
        variant = HubVariant.from_file(args.variant).for_org(args.repo_id.split("/")[0])
    if not token:
        raise PushError(f"push to {args.repo_id} failed at step 'find the token': set HF_TOKEN or pass --token.")
    dataset_repo_id = args.dataset_repo_id or args.repo_id
    datasets = list(dict.fromkeys(variant.datasets + ([dataset_repo_id] if args.dataset else [])))
    upload = prepare_model(args, variant, token, datasets) if args.checkpoint else None
    splits, described = prepare_dataset(args, variant, dataset_repo_id, token) if args.dataset else (None, None)
    if args.space:  # every check of the Space's files, before any request (the model's sha is filled in later)
        prepare_space(args, variant, token, model_revision="0" * 40)

    summary = {}
    if args.dataset:
        summary.update(push_dataset(args, variant, token, dataset_repo_id, splits, described))
    if args.checkpoint:
        summary.update(push_model(args, variant, token, upload))
    if args.space:
        summary.update(push_space(args, variant, token, model_revision=summary.get("sha")))
    return summary


# ---- the Space (the latent inspector of `trainers.space`) -------------------------------------------------------------
def prepare_space(args: PushArguments, variant: HubVariant, token: str, model_revision: str) -> dict[str, bytes]:
    """The Space's files, {path: bytes}, checked for the token (every byte of every file, images included)."""
    from .space import space_files

    with step(args.space, "check the Space files", token):
        files = space_files(args.repo_id, model_revision, title=variant.card.title, license=variant.license,
                            requirement=args.space_requirement)
        for path, content in files.items():
            if token and token.encode() in content:
                raise ValueError(f"the Space file {path} contains the Hub token; refusing to upload it (remove the "
                                 "token from --space_requirement or the variant)")
    return files


def push_space(args: PushArguments, variant: HubVariant, token: str, model_revision: str | None) -> dict:
    """The Space in one commit: app.py, requirements.txt, README.md (Space card), examples/. The app loads the model
    at `model_revision` (the model commit just made, else the model repo's current head)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    space, api = args.space, HfApi(token=token)
    with step(space, f"read the model repo {args.repo_id}", token):
        model = api.model_info(args.repo_id, revision=model_revision or args.revision)
    model_revision = model_revision or model.sha
    files = prepare_space(args, variant, token, model_revision)
    with step(space, "create the Space", token):
        api.create_repo(space, repo_type="space", space_sdk="gradio", private=not args.public, exist_ok=True)
    # A Space serves its main branch, whichever branch the model went to.
    with step(space, "read the head of 'main'", token):
        head = api.repo_info(space, repo_type="space", revision="main")
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=content) for path, content in files.items()]
    with step(space, "upload the Space files and commit", token,
              note=f". Nothing was published: 'main' is still at {head.sha}."):
        commit = api.create_commit(space, repo_type="space", operations=operations, revision="main",
                                   parent_commit=head.sha,
                                   commit_message=f"Latent inspector for {args.repo_id} at {model_revision[:12]}")
    print(f"published Space {space} at {commit.oid} ({len(operations)} files, one commit; the app loads "
          f"{args.repo_id} at {model_revision})")
    if model.private:
        print(f"  {args.repo_id} is private: give the Space a read token as its secret HF_TOKEN (Space settings), "
              "or it cannot load the model")
    return dict(space_repo_id=space, space_sha=commit.oid, space_files=sorted(files))


def publish(args: PushArguments) -> dict:
    """`gap push`: `push` with stdout, stderr and logging masked for the token; a failure exits 1 with one line."""
    secret = resolve_token(args)
    with masked_output(secret):
        try:
            return push(args)
        except PushError as err:
            print(f"\nerror: {err}", file=sys.stderr)  # on its own line, after any progress bar
            raise SystemExit(1) from None
        except Exception:  # noqa: BLE001 - a bug: show it, masked, and fail
            traceback.print_exc()
            raise SystemExit(1) from None
