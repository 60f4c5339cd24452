"""vLLM model class for GAP checkpoints: Qwen2.5-VL whose latent slots are fed the latent head's output.

It is vLLM's Transformers modeling backend (`TransformersMultiModalForCausalLM`: transformers' Qwen2.5-VL modules with
vLLM's paged attention, linear layers and LM head) plus the latent feedback. vLLM's own Qwen2.5-VL module cannot be
used without torchvision (it imports transformers' torchvision image processor at import time).

One forward of vLLM's V1 runner holds many requests, flattened. For every request the worker's
`GapLatentSpanProcessor` (same process, rows in batch order) keeps a `RequestState`; the forward context's
attention metadata gives each row's tokens (`query_start_loc`) and sequence length (`seq_lens`). Then:

- after the language model ran, each row whose next element is a latent slot (its span state says so) gets
  `latent_head(final hidden state of its last token)` (after the request's intervention) recorded as the vector of
  sequence index `seq_len`;
- before it runs, every `<|latent_pad|>` token at sequence index j takes the vector recorded for j in place of its
  token embedding (the runner passes the raw ids because `requires_raw_input_tokens = True`); a `<|latent_pad|>`
  the model sampled outside a span keeps its token embedding, as in GAP generate.

Recording by sequence index makes the vectors survive preemption: a recomputed request replays exactly what it was
fed (chunked prefill included). Nothing of vLLM is patched; the model only reads the forward context.
"""

from __future__ import annotations

import logging

import torch
from modeling_gap.modeling_gap import GapLatentHead
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM
from vllm.model_executor.models.transformers.multimodal import MultiModalDummyInputsBuilder, MultiModalProcessor
from vllm.multimodal import MULTIMODAL_REGISTRY

from .config import GapSpec
from .processing import GapProcessingInfo
from .spans import processor_for

logger = logging.getLogger("gap_vllm")


def refuse_unsupported(vllm_config) -> None:
    """Configurations under which latent feedback cannot be right: refused with what to do instead."""
    if vllm_config.speculative_config is not None:
        raise ValueError(
            "GAP checkpoints cannot be served with speculative decoding: drafted tokens cannot carry the continuous "
            "latents a span feeds (and vLLM runs no custom logits processor with it). Serve without "
            "--speculative-config."
        )
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            "GAP checkpoints must be served without prefix caching: vLLM keys cached KV blocks by token ids, but "
            "the KV of a latent span depends on the vectors fed at its slots (the request's latent_feedback and "
            "latent_intervention), so a request recomputed after preemption could reuse another request's span. "
            "Pass --no-enable-prefix-caching (Python: LLM(..., enable_prefix_caching=False))."
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(
            "GAP checkpoints cannot be served with pipeline parallelism yet: a latent slot is fed from the final "
            "hidden state of the last stage, but embeddings are built on the first. Use tensor parallelism "
            "(--tensor-parallel-size) instead of --pipeline-parallel-size."
        )


def _attention_metadata():
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batching: one dict per micro-batch
        metadata = metadata[0] if len(metadata) == 1 else None
    if isinstance(metadata, dict):
        metadata = next(iter(metadata.values()), None)
    if metadata is None or not hasattr(metadata, "query_start_loc") or not hasattr(metadata, "seq_lens"):
        return None
    return metadata


@MULTIMODAL_REGISTRY.register_processor(
    MultiModalProcessor,
    info=GapProcessingInfo,
    dummy_inputs=MultiModalDummyInputsBuilder,
)
class GapQwen2_5VLForConditionalGeneration(TransformersMultiModalForCausalLM):
    requires_raw_input_tokens = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        refuse_unsupported(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        self.gap = GapSpec.from_hf_config(hf_config)
        # The package's head (weights loaded below): the same module, names and math as training and GAP generate.
        self.latent_head = GapLatentHead(hf_config)
        self._gap_vllm_config = vllm_config
        self._gap_warned = False

    # ---- weights ------------------------------------------------------------------------------------------
    def load_weights(self, weights):
        head, rest = {}, []
        for name, tensor in weights:
            if name.startswith("latent_head."):
                head[name[len("latent_head."):]] = tensor
            else:
                rest.append((name, tensor))
        loaded = super().load_weights(rest)
        own = dict(self.latent_head.named_parameters()) | dict(self.latent_head.named_buffers())
        for name, tensor in head.items():
            if name not in own:
                raise ValueError(f"Unexpected latent head tensor latent_head.{name} in the checkpoint.")
            with torch.no_grad():
                own[name].copy_(tensor.to(own[name].dtype))
            loaded.add(f"latent_head.{name}")
        missing = sorted(set(own) - set(head))
        if missing:
            logger.warning("gap_vllm: the checkpoint has no latent head tensors %s: an unfitted head is used "
                           "(identity subspace, unit scale, ema_norm 0).", missing)
            loaded.update(f"latent_head.{n}" for n in missing)
        if self.gap.feedback == "ema_norm" and float(self.latent_head.ema_norm) == 0:
            logger.warning("gap_vllm: latent_feedback is 'ema_norm' but the head's ema_norm buffer is 0 "
                           "(uncalibrated): latents would be zero. Fit the head (fit_latent_head_pca) first.")
        return loaded

    # ---- latent feedback ----------------------------------------------------------------------------------
    def _rows(self, num_tokens: int):
        """`(states, starts, seq_lens)` of this forward, or None when it carries no request (profiling runs)."""
        metadata = _attention_metadata()
        processor = processor_for(self._gap_vllm_config)
        if metadata is None or processor is None:
            return None
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()[: len(starts) - 1]
        if not seq_lens or starts[-1] > num_tokens:
            return None
        states = processor.rows[: len(seq_lens)]
        if len(states) < len(seq_lens):
            states = states + [None] * (len(seq_lens) - len(states))
        return states, starts, seq_lens

    def _feed(self, rows, input_ids: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        states, starts, seq_lens = rows
        n = starts[-1]
        slots = (input_ids[:n] == self.gap.pad_id).nonzero().flatten().tolist()
        if not slots:
            return inputs_embeds
        positions, vectors = [], []
        row = 0
        for token in slots:
            while starts[row + 1] <= token:
                row += 1
            state = states[row]
            index = seq_lens[row] - (starts[row + 1] - token)
            if state is None:
                raise RuntimeError(
                    "gap_vllm: a latent slot reached the GAP model but no span state exists for its request: the "
                    "gap_latent_spans logits processor (entry point vllm.logits_processors) is not loaded."
                )
            vector = state.latents.get(index)
            if vector is None:
                if index in state.plain:
                    continue  # a slot token sampled outside a span: a plain token (its token embedding)
                if index < state.prompt_len and state.invalid:
                    continue  # a prompt with latent slots: the span processor ends the request at once
                raise RuntimeError(
                    f"gap_vllm: no latent was recorded for the latent slot at sequence index {index} of a request "
                    "(it would be fed a plain slot-token embedding). This happens only if vLLM recomputed a "
                    "request whose latents were lost; please report it."
                )
            positions.append(token)
            vectors.append(vector)
        if positions:
            inputs_embeds = inputs_embeds.clone()
            inputs_embeds[positions] = torch.stack(vectors).to(inputs_embeds.dtype)
        return inputs_embeds

    def _record(self, rows, hidden_states: torch.Tensor) -> None:
        states, starts, seq_lens = rows
        by_feedback: dict[tuple, list] = {}
        for row, state in enumerate(states):
            if state is None or state.slots_left <= 0 or state.invalid:
                continue
            if seq_lens[row] != state.prompt_len + len(state.output):
                continue  # an earlier chunk of a prefill
            index = seq_lens[row]  # the sequence index of the slot this row appends next
            if index in state.latents:
                continue  # recorded before a preemption: replay that
            key = (state.feedback(self.gap), state.options["intervention"])
            by_feedback.setdefault(key, []).append((state, index, starts[row + 1] - 1))
        for (feedback, intervention), items in by_feedback.items():
            hidden = hidden_states[[last for _, _, last in items]]
            latents = self.latent_head(hidden, feedback)
            if intervention == "zero":
                latents = torch.zeros_like(latents)
            for (state, index, _), latent in zip(items, latents):
                state.latents[index] = latent.detach().clone()

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        rows = None
        if input_ids is not None and inputs_embeds is not None and intermediate_tensors is None:
            rows = self._rows(input_ids.shape[0])
            if rows is not None:
                inputs_embeds = self._feed(rows, input_ids, inputs_embeds)
        hidden_states = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if rows is not None and isinstance(hidden_states, torch.Tensor):
            self._record(rows, hidden_states)
        return hidden_states
