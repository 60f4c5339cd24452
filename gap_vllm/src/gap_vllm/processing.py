"""A torchvision-free multimodal processor for GAP checkpoints, given to vLLM through its processing-info class.

vLLM's own Qwen2.5-VL modules import transformers' torchvision image processor at import time, and its processing
path builds `Qwen2_5_VLProcessor` with `AutoProcessor`, which needs torchvision (the video processor) and, on a
checkpoint saved by `GapQwen2_5VLProcessor`, looks for a video processor the checkpoint does not have. `GapProcessingInfo.get_hf_processor` instead builds an image-only
processor from the checkpoint's files as they are: the tokenizer vLLM loaded, transformers'
`Qwen2VLImageProcessorPil` (PIL, no torchvision) configured from `processor_config.json` (or
`preprocessor_config.json`), and the chat template.
"""

import functools
import json

from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file
from vllm.model_executor.models.transformers.multimodal import MultiModalProcessingInfo

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
