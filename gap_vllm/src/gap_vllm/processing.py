"""A torchvision-free multimodal processor for GAP checkpoints, given to vLLM through its processing-info class.

vLLM's own Qwen2.5-VL modules import transformers' torchvision image processor at import time, and its processing
path builds `Qwen2_5_VLProcessor` with `AutoProcessor`, which needs torchvision (the video processor) and, on a
checkpoint saved by `GapQwen2_5VLProcessor`, looks for a video processor the checkpoint does not have. `GapProcessingInfo.get_hf_processor` instead builds an image-only
processor from the checkpoint's files as they are: the tokenizer vLLM loaded, transformers'
`Qwen2VLImageProcessorPil` (PIL, no torchvision) configured from `processor_config.json` (or
`preprocessor_config.json`), and the chat template.

It also holds the frontend's request checks, which refuse before a request reaches the engine (HTTP 400 from the
OpenAI server; `vllm.exceptions.VLLMValidationError`, a client error but not a `ValueError`, from `LLM.generate`):

- `GapRenderer` (renderer / tokenizer mode `"gap"`, registered by `serving_config.register_tokenizer_mode()` in every
  process and chosen for a GAP checkpoint by the architecture's config hook, `serving_config.GapServingConfig`):
  vLLM validates every prompt's token ids with its renderer's `validate_token_ids` (text, token-id, chat and image
  prompts alike), and GAP's refuses a prompt holding `<|latent_pad|>` slots: a prompt cannot carry latent vectors.
- `GapMultiModalProcessor`: the same refusal for prompts with images, whatever the tokenizer mode (vLLM runs the
  multimodal processor only for prompts that carry multimodal data).
- `refuse_structured_outputs(sampling_params)`: structured output (grammar / JSON schema) would fight the span rule;
  for a logits processor's `validate_params`, active only in a process whose engine serves a GAP model.
"""

import functools
import json
import threading
import weakref

from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file
from vllm.exceptions import VLLMValidationError
from vllm.model_executor.models.transformers.multimodal import MultiModalProcessingInfo, MultiModalProcessor
from vllm.renderers.hf import HfRenderer

LATENT_PROMPT_ERROR = (
    "a prompt cannot carry latent vectors: send the text without its latent spans (this prompt holds {count} "
    "<|latent_pad|> slot token(s), id {pad_id}, at position(s) {positions}; a prompt may end in <|latent_start|> "
    "to open a span, which the model then fills)"
)
STRUCTURED_OUTPUT_ERROR = (
    "GAP checkpoints cannot be served with structured output (structured_outputs / guided decoding / "
    "response_format json_schema, json_object, regex, grammar, choice): the grammar mask would fight the latent "
    "span rule (a span's slots and end token are forced). Send the request without the structured output "
    "constraint."
)

_IMAGE_PROCESSOR_KEYS = (
    "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "merge_size",
    "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size", "min_pixels", "max_pixels",
)


class GapImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("GAP checkpoints are served with images and text; videos are not supported.")
        return super().__call__(images=images, text=text, **kwargs)


def _read_json(model: str, name: str, revision):
    path = cached_file(model, name, revision=revision, _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=8)
def image_processor_settings(model: str, revision) -> dict:
    """The image processor fields saved with the checkpoint (`processor_config.json` as `save_pretrained` of a
    processor writes it, or a separate `preprocessor_config.json`)."""
    settings = _read_json(model, "preprocessor_config.json", revision)
    if settings is None:
        settings = (_read_json(model, "processor_config.json", revision) or {}).get("image_processor", {})
    return {k: v for k, v in settings.items() if k in _IMAGE_PROCESSOR_KEYS}


@functools.lru_cache(maxsize=8)
def chat_template(model: str, revision):
    path = cached_file(model, "chat_template.jinja", revision=revision, _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


class GapProcessingInfo(MultiModalProcessingInfo):
    """The Transformers backend's processing info, image-only, with a processor that needs no torchvision."""

    def get_hf_processor(self, **kwargs: object) -> GapImageOnlyProcessor:
        model_config = self.ctx.model_config
        merged = dict(self.ctx.get_merged_mm_kwargs(kwargs))
        settings = image_processor_settings(model_config.model, model_config.revision)
        overrides = {k: v for k, v in merged.items() if k in _IMAGE_PROCESSOR_KEYS}
        key = json.dumps({**settings, **overrides}, sort_keys=True, default=str)
        cache = self.__dict__.setdefault("_gap_processors", {})
        if key not in cache:
            image_processor = Qwen2VLImageProcessorPil(**{**settings, **overrides})
            cache[key] = GapImageOnlyProcessor(
                image_processor=image_processor,
                tokenizer=self.get_tokenizer(),
                chat_template=chat_template(model_config.model, model_config.revision),
            )
        return cache[key]

    def get_image_processor(self, **kwargs: object) -> Qwen2VLImageProcessorPil:
        return self.get_hf_processor(**kwargs).image_processor

    def get_supported_mm_limits(self):
        return {"image": None}


def is_gap_config(hf_config) -> bool:
    """Whether a model config is a GAP checkpoint's."""
    return getattr(hf_config, "latent_start_token_id", None) is not None and hasattr(hf_config, "num_latent_tokens")


def latent_pad_token_id(hf_config) -> int | None:
    """The id of `<|latent_pad|>` in a GAP config (None for any other model)."""
    return getattr(hf_config, "latent_pad_token_id", None) if is_gap_config(hf_config) else None


def check_prompt_token_ids(token_ids, pad_id: int | None, parameter: str | None = "prompt") -> None:
    """Raise `VLLMValidationError` (HTTP 400) if a prompt holds `<|latent_pad|>` slot tokens."""
    if pad_id is None or not token_ids:
        return
    positions = [i for i, t in enumerate(token_ids) if t == pad_id]
    if positions:
        shown = ", ".join(map(str, positions[:8])) + (", ..." if len(positions) > 8 else "")
        raise VLLMValidationError(
            LATENT_PROMPT_ERROR.format(count=len(positions), pad_id=pad_id, positions=shown),
            parameter=parameter,
        )


# Engines in this process whose frontend serves a GAP model (a `GapRenderer` or GAP's multimodal processor was
# built for them): the one piece of model context a logits processor's `validate_params(sampling_params)` can use.
_GAP_FRONTENDS: "weakref.WeakSet" = weakref.WeakSet()
_GAP_FRONTENDS_LOCK = threading.Lock()


def _mark_gap_frontend(owner) -> None:
    with _GAP_FRONTENDS_LOCK:
        _GAP_FRONTENDS.add(owner)


def serves_gap_model() -> bool:
    """Whether a GAP model's frontend (renderer or multimodal processor) lives in this process."""
    with _GAP_FRONTENDS_LOCK:
        return len(_GAP_FRONTENDS) > 0


def refuse_structured_outputs(sampling_params) -> None:
    """For `validate_params`: raise `VLLMValidationError` if a request to a GAP model asks for structured output.

    `validate_params` gets the sampling parameters only, no model: the check applies in a process that built a GAP
    frontend (the API server of a GAP model, or a Python process holding a GAP `LLM`), and nowhere else, so vLLM with
    the plugin installed serves other models, structured output included, as without it (a process that holds a GAP
    `LLM` and another model's `LLM` at once refuses structured output for both).
    """
    if getattr(sampling_params, "structured_outputs", None) is not None and serves_gap_model():
        raise VLLMValidationError(STRUCTURED_OUTPUT_ERROR, parameter="structured_outputs")


class GapMultiModalProcessor(MultiModalProcessor):
    """The Transformers backend's multimodal processor; refuses a prompt (with images) that holds latent slots.

    vLLM runs it only for prompts with multimodal data; text-only prompts are checked by `GapRenderer`."""

    def __init__(self, info, *args, **kwargs):
        super().__init__(info, *args, **kwargs)
        self._gap_pad_id = latent_pad_token_id(info.ctx.model_config.hf_config)
        if self._gap_pad_id is not None:
            _mark_gap_frontend(self)

    def apply(self, inputs, timing_ctx):
        result = super().apply(inputs, timing_ctx)
        check_prompt_token_ids(result.get("prompt_token_ids"), self._gap_pad_id)
        return result


class GapRenderer(HfRenderer):
    """vLLM's HF renderer, and a prompt holding `<|latent_pad|>` slots is refused (`validate_token_ids`, which vLLM's
    input processor calls on every prompt's token ids before the request is sent to the engine)."""

    def __init__(self, config, tokenizer) -> None:
        super().__init__(config, tokenizer)
        self._gap_pad_id = latent_pad_token_id(config.model_config.hf_config)
        if self._gap_pad_id is not None:
            _mark_gap_frontend(self)

    def validate_token_ids(self, token_ids, *, parameter: str | None = None) -> None:
        super().validate_token_ids(token_ids, parameter=parameter)
        check_prompt_token_ids(token_ids, self._gap_pad_id, parameter=parameter or "prompt")
