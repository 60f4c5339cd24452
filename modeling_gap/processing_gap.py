"""Processor of GAP models: Qwen2.5-VL's, with `<|latent|>` markers expanded to latent spans and aux images.

Needs no video processor, so it works with and without torchvision.
"""

from .transformers_compat import SUPPORTED_RANGE  # noqa: F401  (first: the supported-version check)

from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor
from transformers.feature_extraction_utils import BatchFeature

from .configuration_gap import LATENT_END_TOKEN, LATENT_MARKER, LATENT_PAD_TOKEN, LATENT_START_TOKEN


class GapQwen2_5VLProcessor(Qwen2_5_VLProcessor):
    """Image processor + tokenizer of a GAP model.

    `processor(images=..., text=..., aux_images=...)` expands each `<|latent|>` marker in `text` to
    `<|latent_start|>` + K x `<|latent_pad|>` + `<|latent_end|>` and, when `aux_images` (one list per row, one image
    per marker, in order) are given, returns them as `aux_pixel_values` / `aux_image_grid_thw`: the inputs from which
    the model builds the latent targets.

    Args:
        image_processor: a Qwen2-VL image processor (the PIL one works without torchvision).
        tokenizer: a Qwen2 tokenizer holding the three latent tokens.
        chat_template (`str`, *optional*): the Qwen2.5-VL chat template.
        num_latent_tokens (`int`, *optional*, defaults to 8): K, latent slots per span.
        latent_pad_token, latent_start_token, latent_end_token (`str`, *optional*): the token strings of a slot, of
            a span's start and of its end (GAP's by default; a preset's for Monet / Mirage / LVR checkpoints).
    """

    latent_marker = LATENT_MARKER

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_latent_tokens: int = 8,
        latent_pad_token: str = LATENT_PAD_TOKEN,
        latent_start_token: str = LATENT_START_TOKEN,
        latent_end_token: str = LATENT_END_TOKEN,
        **kwargs,
    ):
        self.num_latent_tokens = num_latent_tokens
        self.latent_pad_token = latent_pad_token
        self.latent_start_token = latent_start_token
        self.latent_end_token = latent_end_token
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    @property
    def latent_token_ids(self) -> tuple[int, int, int]:
        """(pad, start, end) ids in the tokenizer."""
        return tuple(
            self.tokenizer.convert_tokens_to_ids(t)
            for t in (self.latent_pad_token, self.latent_start_token, self.latent_end_token)
        )

    @property
    def latent_span(self) -> str:
        return self.latent_start_token + self.latent_pad_token * self.num_latent_tokens + self.latent_end_token

    def expand_latent_markers(self, text: str) -> str:
        return text.replace(self.latent_marker, self.latent_span)

    def __call__(self, images=None, text=None, videos=None, aux_images=None, **kwargs) -> BatchFeature:
        if videos is not None:
            raise ValueError("GapQwen2_5VLProcessor takes images, not videos.")
        rows = [text] if isinstance(text, str) else (list(text) if text is not None else None)
        if aux_images is not None:
            if rows is None:
                raise ValueError("`aux_images` need the `text` whose <|latent|> markers they stand for.")
            if len(rows) == 1 and aux_images and not isinstance(aux_images[0], (list, tuple)):
                aux_images = [aux_images]
            if len(aux_images) != len(rows):
                raise ValueError(
                    f"aux_images has {len(aux_images)} rows but text has {len(rows)}: give one list of aux images per row."
                )
            for row, (sample, aux) in enumerate(zip(rows, aux_images)):
                markers = sample.count(self.latent_marker)
                if markers != len(aux or []):
                    raise ValueError(
                        f"Row {row}: {markers} {self.latent_marker} marker(s) but {len(aux or [])} aux image(s); "
                        "each marker needs exactly one aux image, in order."
                    )
        if rows is not None:
            rows = [self.expand_latent_markers(sample) for sample in rows]
        outputs = super().__call__(images=images, text=rows, **kwargs)
        flat_aux = [image for aux in (aux_images or []) for image in (aux or [])]
        if flat_aux:
            return_tensors = kwargs.get("return_tensors")
            aux = self.image_processor(images=flat_aux, return_tensors=return_tensors)
            outputs["aux_pixel_values"] = aux["pixel_values"]
            outputs["aux_image_grid_thw"] = aux["image_grid_thw"]
        return outputs

    @property
    def model_input_names(self):
        return super().model_input_names + ["aux_pixel_values", "aux_image_grid_thw"]

    @classmethod
    def from_stock(cls, processor, **latent_options) -> "GapQwen2_5VLProcessor":
        """A GAP processor sharing the image processor, tokenizer and chat template of a stock one."""
        return cls(
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            chat_template=getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None),
            **latent_options,
        )

    @classmethod
    def from_stock_pretrained(cls, path: str, latent_options: dict | None = None, **kwargs) -> "GapQwen2_5VLProcessor":
        """Load the image processor and tokenizer of a stock Qwen2.5-VL checkpoint (no torchvision needed)."""
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=getattr(tokenizer, "chat_template", None),
            **(latent_options or {}),
        )


__all__ = ["GapQwen2_5VLProcessor"]
