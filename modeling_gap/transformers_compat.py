"""The one place that knows which transformers release runs the remote code: GAP supports transformers >= 5.19.

Every file of the remote code imports this module first, so that below the supported range the first (and only)
error a user sees is one line naming the range and the `pip install` command. It owns every name that moved inside
the range; the model and generation code use these names and never test versions themselves:

- 5.24 renamed the KV cache from `past_key_values` to `cache`, as a keyword of the model forwards and as a field of
  model and generate outputs (`past_key_values` stays a deprecated keyword alias until 5.40): `CACHE_NAME`,
  `cache_kwargs`, `output_cache`, `accepts_cache_alias`.
- 5.24 added `MultimodalCausalLMOutputWithPast` (the multimodal outputs carry the vision encoder's outputs as
  `image_outputs` / `video_outputs`); before it, Qwen2.5-VL's base model returned no encoder outputs:
  `MultimodalCausalLMOutputWithPast` (a backport below 5.24), `encoder_outputs`.
- 5.21 added `slice_logits_to_keep` to `modeling_utils`: `slice_logits_to_keep` (a backport below 5.21).

What stayed put from 5.19 on (`transformers.initialization`, `mm_token_type_ids`, `mm_encoder_outputs`, `_prefill`,
the static cache) is imported directly. 5.19 is the floor because vLLM's CPU build pins `transformers<5.20` (it
installs 5.19.0), so the package and vLLM share one environment there. (5.18 also ran the compatibility scenario,
once, by hand; 5.17 and older lack Qwen2.5-VL's `mm_encoder_outputs`, which the forward passes.)
"""

import functools
import re
from dataclasses import dataclass

import transformers

MINIMUM_VERSION = (5, 19)
SUPPORTED_RANGE = ">=5.19,<5.40"
INSTALL_COMMAND = f'pip install "transformers{SUPPORTED_RANGE}"'


def _release(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


if _release(transformers.__version__) < MINIMUM_VERSION:
    # `from None` and no other import before this line: the user's first error is this one line.
    raise ImportError(
        f"This GAP checkpoint needs transformers{SUPPORTED_RANGE}; this environment has transformers "
        f"{transformers.__version__}. Upgrade it: {INSTALL_COMMAND}"
    ) from None

import torch  # noqa: E402
from transformers import modeling_outputs  # noqa: E402
from transformers.generation.utils import GenerateDecoderOnlyOutput  # noqa: E402
from transformers.utils import ModelOutput  # noqa: E402
from transformers.utils.deprecation import deprecate_kwarg  # noqa: E402

# ---- the KV cache's name ----------------------------------------------------------------------------------------
CACHE_NAME = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
"""What the installed transformers calls the KV cache: `"cache"` (>= 5.24) or `"past_key_values"`."""


def cache_kwargs(cache) -> dict:
    """`{name: cache}` under the installed transformers' name: for model calls and output constructors."""
    return {CACHE_NAME: cache}


def output_cache(outputs):
    """The KV cache of a model output, whatever the installed transformers calls it."""
    return getattr(outputs, CACHE_NAME)


def accepts_cache_alias(forward):
    """Decorates a forward whose cache argument is named `cache`: it also takes `past_key_values`, the name that
    transformers < 5.24 passes (from `generate`) and that 5.24+ deprecates until 5.40."""
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def renamed(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return renamed


# ---- multimodal outputs -----------------------------------------------------------------------------------------
if hasattr(modeling_outputs, "MultimodalCausalLMOutputWithPast"):
    MultimodalCausalLMOutputWithPast = modeling_outputs.MultimodalCausalLMOutputWithPast
else:
    from transformers.cache_utils import Cache

    @dataclass
    class MultimodalCausalLMOutputWithPast(ModelOutput):
        """transformers 5.24's multimodal causal LM output, for earlier releases: the cache under their name
        (`past_key_values`), and the outputs of the encoders that ran (`image_outputs`, `video_outputs`)."""

        loss: torch.FloatTensor | None = None
        logits: torch.FloatTensor | None = None
        past_key_values: Cache | None = None
        hidden_states: tuple[torch.FloatTensor, ...] | None = None
        attentions: tuple[torch.FloatTensor, ...] | None = None
        image_outputs: ModelOutput | None = None
        video_outputs: ModelOutput | None = None
        audio_outputs: ModelOutput | None = None

        @property
        def cache(self):
            return self.past_key_values


def encoder_outputs(outputs, mm_encoder_outputs: dict | None) -> dict:
    """`image_outputs` / `video_outputs` of a Qwen2.5-VL base-model output. Releases before 5.24 return none: there
    they are the `mm_encoder_outputs` the caller passed in (GAP encodes its images itself), and no video outputs."""
    if hasattr(outputs, "image_outputs"):
        return {"image_outputs": outputs.image_outputs, "video_outputs": outputs.video_outputs}
    return {"image_outputs": (mm_encoder_outputs or {}).get("image"), "video_outputs": None}


# ---- logits slicing ---------------------------------------------------------------------------------------------
try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers < 5.21

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) -> the positions `logits_to_keep` selects: the last n (an int; 0 keeps all) or the
        given indices (a 1-D tensor), as Qwen2.5-VL's forward slices them before 5.21."""
        indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, indices, :]


__all__ = [
    "CACHE_NAME",
    "INSTALL_COMMAND",
    "MultimodalCausalLMOutputWithPast",
    "SUPPORTED_RANGE",
    "accepts_cache_alias",
    "cache_kwargs",
    "encoder_outputs",
    "output_cache",
    "slice_logits_to_keep",
]
