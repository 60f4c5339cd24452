"""The lmms-eval model `gap`: a GAP checkpoint answering a benchmark's requests with GAP's latent-aware `generate`.

    lmms-eval --model gap --model_args pretrained=ORG/gap-7b,latent_intervention=zero \
        --tasks vstar_bench --batch_size 8 --output_path outputs/lmms-eval

`--model_args` are the fields of `GapLmmsConfig` (`key=value,key=value`); `--batch_size` and `--device` are
lmms-eval's own flags. Several GPUs: `accelerate launch --num_processes N -m lmms_eval --model gap ...` runs one copy
of the model per process, each on its own device and its share of the documents (lmms-eval's data parallelism, as for
its own models; on CPU `torchrun --nproc_per_node N -m lmms_eval ...`, since accelerate's launcher starts a single
process on a machine without GPUs); `device_map=auto` instead splits one copy over the GPUs of a single process.
"""

import atexit
import os
import types
import typing
from dataclasses import dataclass, field, fields

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from loguru import logger as eval_logger
from PIL import Image

from modeling_gap.configuration_gap import LATENT_FEEDBACK_MODES, LATENT_INTERVENTIONS, LATENT_MARKER, LATENT_PRESETS

from ..model_loader import load_model

DEFAULT_MAX_NEW_TOKENS = 128  # when neither the task nor `max_new_tokens` sets one (lmms-eval's Qwen2.5-VL default)


@dataclass
class GapLmmsConfig:
    """The `--model_args` of the lmms-eval model `gap` (`key=value,...`; `none` for None)."""

    pretrained: str = field(default=None, metadata={"help": "A GAP checkpoint (folder or Hub id), or a stock / Monet / "
                                                            "Mirage / LVR Qwen2.5-VL checkpoint with `preset`."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of `pretrained`."})
    preset: str | None = field(default=None, metadata={"help": "Stock checkpoints only: whose latent tokens and span "
                                                               "rule (gap, monet, mirage, lvr), via from_qwen2_5_vl."})
    num_latent_tokens: int | None = field(default=None, metadata={"help": "Stock checkpoints only: K."})
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16, float32."})
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1, cpu (default: cuda if there is one)."})
    device_map: str | None = field(default=None, metadata={"help": "auto: one copy split over this process' GPUs."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2."})
    batch_size: int = field(default=1, metadata={"help": "Requests per generate call (lmms-eval's --batch_size)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Overrides the task's max_new_tokens. Latent "
                                                                       "slots count: a span takes K + 2 positions."})
    latent_feedback: str | None = field(default=None, metadata={"help": "Override the checkpoint's feedback."})
    latent_intervention: str | None = field(default=None, metadata={"help": "Probe: zero, noise, shuffle, mean, drop."})
    latent_intervention_seed: int = field(default=0, metadata={"help": "Seed of noise / shuffle."})
    max_latent_spans: int | None = field(default=None, metadata={"help": "After this many spans a row opens no more."})
    show_latent_spans: bool = field(default=False, metadata={"help": "Write <|latent|> where a span was generated in "
                                                                     "the returned (and logged) text."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the checkpoint's own code."})
    allow_pickle_weights: bool = field(default=False, metadata={"help": "Accept pytorch_model.bin (pickle) weights."})

    def __post_init__(self):
        if not self.pretrained:
            raise ValueError("gap: pretrained is required: --model_args pretrained=PATH_OR_HUB_ID[,...].")
        if self.preset is not None and self.preset not in LATENT_PRESETS:
            raise ValueError(f"gap: preset must be one of {tuple(LATENT_PRESETS)}; got {self.preset!r}.")
        if self.latent_feedback is not None and self.latent_feedback not in LATENT_FEEDBACK_MODES:
            raise ValueError(f"gap: latent_feedback must be one of {LATENT_FEEDBACK_MODES}; "
                             f"got {self.latent_feedback!r}.")
        if self.latent_intervention not in LATENT_INTERVENTIONS:
            choices = tuple(i for i in LATENT_INTERVENTIONS if i)
            raise ValueError(f"gap: latent_intervention must be one of {choices}; got {self.latent_intervention!r}.")
        for name in ("batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"gap: {name} must be a positive integer; got {value!r}.")
        if self.max_latent_spans is not None and self.max_latent_spans < 0:
            raise ValueError(f"gap: max_latent_spans must be >= 0; got {self.max_latent_spans!r}.")

    @classmethod
    def from_model_args(cls, **model_args) -> "GapLmmsConfig":
        """The config from lmms-eval's parsed `--model_args` (values already turned into bool / int / float / str by
        lmms-eval): unknown names are refused, each value is converted to its field's type."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(model_args) - set(known))
        if unknown:
            raise ValueError(f"gap: unknown model argument(s) {unknown}; the model takes {sorted(known)}.")
        return cls(**{name: _convert(name, known[name].type, value) for name, value in model_args.items()})


def _convert(name: str, annotation, value):
    """One `--model_args` value to its field's type (`none` -> None; `8` -> 8; `true` -> True)."""
    if isinstance(value, str) and value.lower() in ("none", "null") and _is_optional(annotation):
        return None
    base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"gap: model argument {name} must be true or false; got {value!r}.")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"gap: model argument {name} must be an integer; got {value!r}.")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"gap: model argument {name} must be an integer; got {value!r}"
                             + (" (lmms-eval's --batch_size auto is not supported: give a number)."
                                if name == "batch_size" else ".")) from None
    return value if value is None else str(value)


def _is_optional(annotation) -> bool:
    return isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)


def _leave_process_group():
    """At exit, every rank waits for the others before the process group goes: a rank whose peer has already torn the
    group down while it is still in a collective is aborted by gloo (a SIGABRT after the results were written)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class GapLmms(lmms):
    """A GAP checkpoint as an lmms-eval chat model (`is_simple = False`): images and text in, text out.

    Requests are answered in order, `batch_size` at a time (left padding), each batch with one `generate` call; a
    batch holds requests of one generation setting. Greedy when the task's `temperature` is 0 (lmms-eval's default),
    sampling otherwise. The task's `until` strings cut the returned text.
    """

    is_simple = False

    def __init__(self, **model_args):
        super().__init__()
        self.gap_config = config = GapLmmsConfig.from_model_args(**model_args)
        self.accelerator = accelerator = Accelerator()
        world_size = max(accelerator.num_processes, int(os.environ.get("WORLD_SIZE", "1")))
        if world_size > 1:
            # lmms-eval's data parallelism: one copy of the model per process, the documents shared out by rank
            # (`accelerate launch` on GPUs; `torchrun` also on CPU, where accelerate's launcher starts one process).
            if config.device_map is not None:
                raise ValueError("gap: device_map splits one copy over GPUs; with several processes each process "
                                 "holds its own copy: drop device_map, or run one process.")
            local_rank = int(os.environ.get("LOCAL_RANK", accelerator.local_process_index))
            self._device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
            self._rank = int(os.environ.get("RANK", accelerator.process_index))
            self._world_size = world_size
            atexit.register(_leave_process_group)
        else:
            self._device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gap_options = {"preset": config.preset, "num_latent_tokens": config.num_latent_tokens}
        model, self.processor = load_model(
            config.pretrained, stock="convert", dtype=config.dtype, revision=config.revision,
            attn_implementation=config.attn_implementation, device_map=config.device_map, gap_options=gap_options,
            trust_remote_code=config.trust_remote_code, allow_pickle_weights=config.allow_pickle_weights,
        )
        if config.device_map is None:
            model = model.to(self._device)
        self._model = model.eval()
        self.processor.tokenizer.padding_side = "left"
        self.batch_size_per_gpu = config.batch_size
        if self._world_size > 1 and accelerator.is_local_main_process:
            eval_logger.info(f"gap: {self._world_size} processes, data parallel")

    # ---- what lmms-eval reads ---------------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    # ---- generation -------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """One `GenerationResult` per request, in the requests' order."""
        from tqdm import tqdm

        results = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[2].items())), []).append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="gap responding")
        for indices in groups.values():
            for begin in range(0, len(indices), self.batch_size):
                chunk = indices[begin : begin + self.batch_size]
                for index, result in zip(chunk, self._generate_batch([requests[i] for i in chunk])):
                    results[index] = result
                progress.update(len(chunk))
        progress.close()
        return results

    @torch.no_grad()
    def _generate_batch(self, requests: list[Instance]) -> list[GenerationResult]:
        texts, images = [], []
        for request in requests:
            _context, doc_to_messages, _gen_kwargs, doc_id, task, split = request.args
            messages = doc_to_messages(self.task_dict[task][split][doc_id])
            text, row_images = self._prompt(messages, where=f"{task} document {doc_id}")
            texts.append(text)
            images.extend(row_images)
        inputs = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self._input_device())
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        gen_kwargs = dict(requests[0].args[2])
        until = gen_kwargs.pop("until", None)
        sequences = self._model.generate(**inputs, **self._generate_kwargs(gen_kwargs))
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:].tolist()
        results = []
        for tokens in new_tokens:
            text = self._decode(tokens)
            for stop in [until] if isinstance(until, str) else until or []:
                if stop:
                    text = text.split(stop)[0]
            pad = self.tokenizer.pad_token_id
            results.append(GenerationResult(text=text, token_counts=TokenCounts(
                output_tokens=sum(1 for t in tokens if t != pad))))
            self.cache_hook.add_partial("generate_until", (texts[len(results) - 1], gen_kwargs), text)
        return results

    def _prompt(self, messages, where: str) -> tuple[str, list]:
        """The chat template's text and the images of one request (lmms-eval's messages: images as PIL images or
        paths; image parts stay where the task put them)."""
        chat = ChatMessages(messages=messages)
        hf_messages, images = [], []
        for message in chat.messages:
            content = []
            for part in message.content:
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                elif part.type == "image":
                    image = part.url if isinstance(part.url, Image.Image) else Image.open(part.url)
                    images.append(image.convert("RGB"))
                    content.append({"type": "image"})
                else:
                    raise ValueError(f"gap: {where} holds a {part.type} part; GAP models take images and text only.")
            hf_messages.append({"role": message.role, "content": content})
        text = self.processor.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
        return text, images

    def _input_device(self):
        return next(self._model.parameters()).device

    def _generate_kwargs(self, task_kwargs: dict) -> dict:
        """The task's generation settings (lmms-eval's names) as `generate` arguments, with the latent options."""
        config = self.gap_config
        max_new_tokens = config.max_new_tokens or task_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        temperature = task_kwargs.get("temperature") or 0
        kwargs = dict(max_new_tokens=int(max_new_tokens), do_sample=temperature > 0)
        if temperature > 0:
            kwargs["temperature"] = temperature
            if task_kwargs.get("top_p") is not None:
                kwargs["top_p"] = task_kwargs["top_p"]
        if task_kwargs.get("num_beams", 1) != 1:
            kwargs["num_beams"] = task_kwargs["num_beams"]  # refused by GAP generate, with the reason
        if getattr(self._model.config, "latent_start_token_id", None) is not None:
            kwargs.update(latent_intervention=config.latent_intervention,
                          latent_intervention_seed=config.latent_intervention_seed,
                          max_latent_spans=config.max_latent_spans)
            if config.latent_feedback:
                kwargs["latent_feedback"] = config.latent_feedback
        return kwargs

    def _decode(self, tokens: list[int]) -> str:
        """The generated text, special tokens dropped; with `show_latent_spans`, `<|latent|>` where each span was."""
        start = getattr(self._model.config, "latent_start_token_id", None)
        if not self.gap_config.show_latent_spans or start is None or start not in tokens:
            return self.processor.decode(tokens, skip_special_tokens=True)
        end = self._model.config.latent_end_token_id
        pieces, segment, inside = [], [], False
        for token in tokens:
            if token == start:
                pieces += [self.processor.decode(segment, skip_special_tokens=True), LATENT_MARKER]
                segment, inside = [], True
            elif inside:
                inside = token != end
            else:
                segment.append(token)
        pieces.append(self.processor.decode(segment, skip_special_tokens=True))
        return "".join(pieces)

    def loglikelihood(self, requests):
        raise NotImplementedError("gap: loglikelihood tasks are not supported; GAP models are evaluated by generation "
                                  "(generate_until tasks).")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("gap: multi-round tasks are not supported; use generate_until tasks.")


__all__ = ["GapLmms", "GapLmmsConfig"]
