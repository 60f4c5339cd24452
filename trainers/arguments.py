"""The argument dataclass of each stage: what `gap <stage> --config FILE.yaml` (and `recipes/<stage>.py`) parses.

Every field can be set in the YAML given by `--config` and overridden on the command line (`--field value`, or
`--field-name value`). The SFT stage parses `GapScriptArguments`, `trainers.GapSFTConfig` and TRL's `ModelConfig`.
"""

from dataclasses import dataclass, field

from trl import ScriptArguments

from modeling_gap.configuration_gap import LATENT_FEEDBACK_MODES, LATENT_INTERVENTIONS

SOURCE_FORMATS = ("monet", "mirage", "lvr")
COLUMN_MAPPING_NAMES = ("gap", "mathvista", "vstar", "hrbench", "mme_realworld")


@dataclass
class ConvertDatasetArguments:
    """`gap convert`: Monet / Mirage / LVR data -> GAP's schema (`trainers.dataset_conversion`)."""

    format: str = field(metadata={"help": "source format", "choices": list(SOURCE_FORMATS)})
    input: str = field(metadata={"help": "Monet: JSON list; Mirage: JSONL; LVR: JSON list or JSONL"})
    output: str = field(metadata={"help": "directory to save the dataset to (datasets.save_to_disk)"})
    image_root: str | None = field(
        default=None,
        metadata={"help": "folder the image paths are read from; every image must resolve (after .. and symlinks) "
                          "inside it, else its row is skipped (default: the input's folder)"},
    )
    allow_outside_root: bool = field(
        default=False,
        metadata={"help": "read image paths that lead outside --image-root too (absolute paths as they are)"},
    )
    max_image_pixels: int | None = field(
        default=64_000_000,
        metadata={"help": "skip rows with an image of more pixels than this (width x height), before decoding it"},
    )
    strict: bool = field(default=False, metadata={"help": "stop at the first row that cannot be converted"})
    require_answer: bool = field(
        default=False, metadata={"help": "skip rows without an answer (default: keep them, answer '')"}
    )
    keep_observation_tags: bool = field(default=False, metadata={"help": "Monet: keep <observation> tags in the text"})
    max_rows: int | None = field(default=None, metadata={"help": "convert only the first N rows (N >= 1)"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace an existing output directory (refused when it holds the input or the image root)"},
    )

    def __post_init__(self):
        for name in ("max_rows", "max_image_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be a whole number >= 1 (or left out), not {value!r}")


@dataclass
class ModelArguments:
    """The model a stage loads (`trainers.model_loader.load_model`)."""

    model_name_or_path: str = field(
        default=None, metadata={"help": "'tiny', a GAP checkpoint, or a stock Qwen2.5-VL (directory or Hub id)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the checkpoint's own code (not needed for GAP checkpoints)."}
    )
    allow_pickle_weights: bool = field(
        default=False, metadata={"help": "Load pickled weights (pytorch_model.bin); they can run code."}
    )


@dataclass
class FitPCAArguments(ModelArguments):
    """`gap fit-pca`: fit the PCA-aligned latent head on calibration images (`trainers.pca_fit`)."""

    dataset_name: str = field(default=None, metadata={"help": "A `save_to_disk` directory or a Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split whose images calibrate."})
    image_columns: str = field(default="images,aux_images", metadata={"help": "Comma list of image columns to use."})
    max_images: int = field(default=2048, metadata={"help": "Stop after this many images."})
    rank: int | None = field(default=None, metadata={"help": "PCA rank r (default: config.latent_pca_rank, capped)."})
    method: str = field(default="exact", metadata={"help": "exact | randomized (torch.svd_lowrank)."})
    batch_size: int = field(default=8, metadata={"help": "Images per vision-tower forward."})
    num_latent_tokens: int | None = field(
        default=None, metadata={"help": "K, when converting a stock checkpoint (default: the preset's, 8)."})
    latent_feedback: str | None = field(
        default=None, metadata={"help": "Feedback mode when converting a stock checkpoint (default: pca).",
                                "choices": list(LATENT_FEEDBACK_MODES)})
    latent_pca_rank: int | None = field(
        default=None, metadata={"help": "The head's PCA rank, when converting a stock checkpoint (default 256)."})
    output_dir: str = field(default="outputs/gap-pca", metadata={"help": "Where the fitted checkpoint is written."})


@dataclass
class CapacityArguments(ModelArguments):
    """`gap assign-capacity`: the base model's pass rate per row, and `use_latent` (`trainers.capacity`)."""

    dataset_name: str = field(default=None, metadata={"help": "A `save_to_disk` directory or a Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split to assign."})
    num_samples: int = field(default=4, metadata={"help": "Sampled answers per row."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generated tokens per answer."})
    capacity_threshold: float = field(default=0.5, metadata={"help": "use_latent = base_pass_rate <= this."})
    batch_size: int = field(default=8, metadata={"help": "Rows per generate call."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output_dir: str = field(default="outputs/capacity", metadata={"help": "Where the assigned dataset goes."})


@dataclass
class GapScriptArguments(ScriptArguments):
    """`gap sft`: TRL's `ScriptArguments` (dataset name, config, splits) plus the tiny model, the synthetic task and
    the PCA fit (`trainers.sft`)."""

    synthetic_rows: int = field(default=256, metadata={"help": "Training rows of the synthetic task."})
    synthetic_eval_rows: int = field(default=64, metadata={"help": "Evaluation rows of the synthetic task."})
    synthetic_image_size: int = field(default=56, metadata={"help": "Board image side in pixels (56 to 112)."})
    synthetic_grid: int = field(default=2, metadata={"help": "Cells per side of the synthetic board."})
    synthetic_num_colors: int = field(default=4, metadata={"help": "Colours of the synthetic task (chance = 1/n)."})
    synthetic_use_latent_fraction: float | None = field(
        default=None, metadata={"help": "Add a random use_latent column, True with this probability."}
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "Text width of the 'tiny' model."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Decoder layers of the 'tiny' model."})
    num_latent_tokens: int | None = field(
        default=None, metadata={"help": "K, for the 'tiny' model and stock conversion (default: 4 tiny, 8 stock)."}
    )
    latent_feedback: str | None = field(
        default=None, metadata={"help": "Feedback mode (pca | ema_norm | raw), for 'tiny' and stock conversion.",
                                "choices": list(LATENT_FEEDBACK_MODES)}
    )
    fit_pca_rows: int = field(
        default=0, metadata={"help": "Fit the head's PCA on the images of the first N training rows (0: no fit)."}
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "With LoRA, also save the merged GAP checkpoint to output_dir/merged."}
    )
    allow_pickle_weights: bool = field(
        default=False, metadata={"help": "Load pickled weights (pytorch_model.bin); they can run code."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train again from scratch where output_dir holds a finished run."}
    )


@dataclass
class EvalArguments(ModelArguments):
    """`gap eval`, `gap probe`, `gap diagnose-norms`, `gap latent-lens` (`trainers.evaluation`,
    `trainers.diagnostics`)."""

    dataset_name: str = field(default=None, metadata={"help": "A `save_to_disk` directory or a Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="test", metadata={"help": "Split to evaluate."})
    column_mapping: str = field(
        default="gap", metadata={"help": "How the columns map to ours.", "choices": list(COLUMN_MAPPING_NAMES)})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    batch_size: int = field(default=8, metadata={"help": "Rows per generate call."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generated positions per row (latent slots count)."})
    latent_feedback: str | None = field(
        default=None, metadata={"help": "Override the checkpoint's feedback.", "choices": list(LATENT_FEEDBACK_MODES)})
    latent_intervention: str | None = field(
        default=None, metadata={"help": "Probe one intervention (default: none).",
                                "choices": [i for i in LATENT_INTERVENTIONS if i]})
    latent_intervention_seed: int = field(default=0, metadata={"help": "Seed of noise / shuffle."})
    cache_implementation: str | None = field(default=None, metadata={"help": "'static' for the compiled path."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where predictions and results go."})


@dataclass
class PushArguments:
    """`gap push`: publish a variant in one commit (`trainers.hub`)."""

    variant: str = field(default=None, metadata={"help": "A variant file in hub_configs/."})
    repo_id: str = field(default=None, metadata={"help": "Target model repo, ORG/NAME."})
    checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint (or LoRA adapter) directory."})
    dataset: str | None = field(default=None, metadata={"help": "A `save_to_disk` training dataset to push too."})
    dataset_repo_id: str | None = field(default=None, metadata={"help": "Target dataset repo (default: repo_id)."})
    results: str | None = field(default=None, metadata={"help": "JSON file of measured figures for the card."})
    public: bool = field(default=False, metadata={"help": "Create the repos public (default: private)."})
    revision: str = field(default="main", metadata={"help": "Branch to commit to."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message (default: names the variant)."})
    token: str | None = field(default=None, metadata={"help": "Hub write token (default: HF_TOKEN / saved login)."})
    # The Space (trainers.space): the latent inspector of the model, published next to it.
    space: str | None = field(
        default=None, metadata={"help": "Also publish the latent-inspector Space ORG/NAME for --repo-id (gradio)."})
    space_requirement: str | None = field(
        default=None, metadata={"help": "The Space's requirement line for this package (default: gap-vlm[space]=="
                                        "<this version>; e.g. a pinned git URL)."})


@dataclass
class MakeTinyArguments:
    """`gap make-tiny`: write a tiny random GAP checkpoint, or a stock Qwen2.5-VL one (`trainers.tiny`)."""

    output_dir: str = field(default="outputs/tiny-gap", metadata={"help": "Directory to write the checkpoint to."})
    stock: bool = field(
        default=False, metadata={"help": "Write a stock Qwen2.5-VL checkpoint (no latent tokens) instead of GAP's."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights."})
    num_latent_tokens: int = field(default=4, metadata={"help": "K (GAP checkpoints)."})
    latent_feedback: str = field(
        default="pca", metadata={"help": "Feedback mode (GAP checkpoints).", "choices": list(LATENT_FEEDBACK_MODES)})
    hidden_size: int = field(default=64, metadata={"help": "Text width."})
    num_layers: int = field(default=2, metadata={"help": "Decoder layers."})


@dataclass
class MakeDataArguments:
    """`gap make-data`: write the offline synthetic task as a `save_to_disk` dataset (splits `train` and `test`, rows
    in GAP's schema: every stage reads it with `--dataset_name DIR`) (`trainers.dataset_loader`)."""

    output_dir: str = field(default="outputs/tiny-data", metadata={"help": "Directory to write the dataset to."})
    train_rows: int = field(default=256, metadata={"help": "Rows of the train split."})
    test_rows: int = field(default=64, metadata={"help": "Rows of the test split."})
    seed: int = field(default=0, metadata={"help": "Seed of the train split (the test split uses seed + 1)."})


@dataclass
class SpaceArguments(ModelArguments):
    """`gap space`: run the latent inspector of one checkpoint (a directory, offline, or a Hub id)."""

    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch or commit sha) to load."})
    host: str | None = field(
        default=None, metadata={"help": "Address to listen on (default: gradio's, 127.0.0.1; a Space sets 0.0.0.0)."})
    port: int | None = field(default=None, metadata={"help": "Port (default: gradio's, 7860 or the next free one)."})
    examples_dir: str | None = field(
        default=None, metadata={"help": "Folder of example images with an examples.json of [image, question] "
                                        "pairs (default: two boards of the synthetic shape task)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Initial 'max new tokens' of the page."})
    max_latent_spans: int | None = field(
        default=None, metadata={"help": "Initial 'max latent spans' of the page (default: no limit)."})
    max_upload_pixels: int = field(
        default=25_000_000, metadata={"help": "Refuse uploaded images of more pixels (width x height) than this."})
    max_upload_mb: int = field(default=20, metadata={"help": "Refuse uploaded files larger than this (MB)."})
    queue_size: int = field(
        default=32, metadata={"help": "Requests that may wait for the model; more are turned away with a message."})

    def __post_init__(self):
        for name in ("max_new_tokens", "max_upload_pixels", "max_upload_mb", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)!r}.")
        if self.max_latent_spans is not None and self.max_latent_spans < 0:
            raise ValueError(f"--max_latent_spans must be >= 0 or left out; got {self.max_latent_spans!r}.")


__all__ = [
    "CapacityArguments",
    "MakeDataArguments",
    "ConvertDatasetArguments",
    "EvalArguments",
    "FitPCAArguments",
    "GapScriptArguments",
    "MakeTinyArguments",
    "ModelArguments",
    "PushArguments",
    "SOURCE_FORMATS",
    "SpaceArguments",
]
