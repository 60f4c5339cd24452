"""vLLM model class for GAP checkpoints: Qwen2.5-VL whose latent slots are fed the latent head's output.

It is vLLM's Transformers modeling backend (`TransformersMultiModalForCausalLM`: transformers' Qwen2.5-VL modules with
vLLM's paged attention, linear layers and LM head) plus the latent feedback. vLLM's own Qwen2.5-VL module cannot be
used without torchvision (it imports transformers' torchvision image processor at import time).

The latent state lives on the device in a `LatentStore` allocated at load (`latent_store.py`: history, pending
vector and span state per request slot); the model only adapts vLLM's hooks to it:

- **feed** (before the decoder; V1: in `forward`, from the forward context's `query_start_loc` / `seq_lens` and the
  row -> slot map the span processor keeps; V2: in `GapModelState.prepare_inputs_embeds`, from the input batch's
  `idx_mapping`): each row's new token is folded into the span state, then every `<|latent_pad|>` slot takes the
  vector recorded for its sequence position (the history, else the pending vector);
- **record** (the rows the sampler uses: `compute_logits`, armed once per step, holds their hidden states, slots and
  next positions in persistent buffers; the next feed records them in the same call, or `flush_record` does before
  a request takes a slot): the head's latent (the request's feedback mode and intervention, chosen per row by tensor
  ops) becomes the slot's pending vector for the next position;
- **span rule**: the span processor (`spans.py`), on the logits.

All are fixed-shape tensor ops (no host read). Until the core has been shown exact under CUDA-graph replay on a
GPU, full CUDA graphs are turned off for GAP checkpoints (`GapServingConfig`: piecewise graphs, the backbone
captured, the GAP code eager). Nothing of vLLM is patched.
"""

from __future__ import annotations

import logging

import torch
from modeling_gap.modeling_gap import GapLatentHead
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM
from vllm.model_executor.models.transformers.multimodal import MultiModalDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY

from .config import GapSpec
from .latent_store import FEEDBACK_CODES, LatentStore, SpanTokens, compile_step, size_oblivious
from .processing import GapMultiModalProcessor, GapProcessingInfo
from .spans import GapServing, eos_id

logger = logging.getLogger("vllm.gap_vllm")


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
    GapMultiModalProcessor,
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
        max_rows = vllm_config.scheduler_config.max_num_seqs
        tokens = SpanTokens(pad=self.gap.pad_id, start=self.gap.start_id, end=self.gap.end_id, eos=eos_id(vllm_config))
        # Twice the batch: requests out of the batch (preempted or finished) keep their slot until it is needed.
        store = LatentStore(2 * max_rows, self.gap.latent_capacity, hf_config.text_config.hidden_size, tokens,
                            dtype=vllm_config.model_config.dtype, device=self.latent_head.proj.weight.device)
        self.serving = GapServing(self.gap, store, max_rows, vllm_config)
        # The per-step GAP code is many small tensor ops: in vLLM's compiled mode it is compiled too (a few fused
        # kernels instead of ~150 launches a step), warmed up after loading so no request waits for it.
        self._record_and_feed_step = self._record_and_feed
        self.serving.flush_record = self.flush_record
        self._compiled = vllm_config.compilation_config.mode not in (None, 0)  # 0: CompilationMode.NONE (eager)
        if self._compiled:
            # The two calls of a step: the previous step's record with this one's feed (see `compute_logits`), and
            # the span rule. A feed with nothing held and a record flushed before an admission run eagerly (steps
            # that admit a request, which are prefill steps anyway).
            self._record_and_feed_step = compile_step(self._record_and_feed)
            self.serving.span_rule = compile_step(store.apply_span_rule)
        if not getattr(vllm_config, "use_v2_model_runner", False):
            log_serving_mode(vllm_config, self.serving, runner="V1")

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
        if self._compiled:
            self._warm_up()
        return loaded

    def _warm_up(self) -> None:
        """Run the compiled GAP steps once per shape class (several rows; one) on the scratch slot, which no request
        uses: compilation happens at start, not in the first request (`size_oblivious`: these two classes cover
        every batch)."""
        store = self.serving.store
        device, hidden_size = store.device, store.hidden_size
        vocab = self.config.get_text_config().vocab_size
        dtype = self.latent_head.proj.weight.dtype
        # As vLLM calls them (dispatch keys and dtypes are part of the compiled code's guards): int32 ids,
        # query_start_loc and seq_lens, all views of persistent buffers taken under inference mode; fresh logits.
        # (Buffers of distinct sizes: equal sizes would make the compiler assume them equal.)
        ids, qsl, seq_lens = (torch.zeros(n, dtype=torch.int32, device=device) for n in (13, 11, 10))
        embeds = torch.zeros(12, hidden_size, dtype=dtype, device=device)
        row_slot = torch.full((9,), store.scratch, dtype=torch.long, device=device)
        serving = self.serving
        with torch.inference_mode(), size_oblivious():
            for tokens, rows, recorded in ((5, 3, 2), (1, 1, 1)):  # the general graph first
                # No token is valid (query_start_loc all 0) and every slot is the scratch one: nothing else is
                # written.
                step = (ids[:tokens], embeds[:tokens], qsl[: rows + 1], seq_lens[:rows], row_slot[:rows])
                self._record_and_feed_step(*serving.recorded_rows(recorded), *step)
                logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
                serving.span_rule(logits, row_slot[:rows])

    # ---- latent feedback ----------------------------------------------------------------------------------
    def feed(self, input_ids, inputs_embeds, query_start_loc, seq_lens, row_slot):
        """(N, H) embeddings -> (N, H) with the latent slots fed (`LatentStore.feed_step`), after recording the
        previous step's sampled rows if that is still due (`GapServing.hold_record`). query_start_loc (R+1,),
        seq_lens (R,): the batch's layout; row_slot (R,): each row's store slot."""
        held = self.serving.take_held_record()
        if held is not None:
            return self._record_and_feed_step(*held, input_ids, inputs_embeds, query_start_loc, seq_lens, row_slot)
        return self.serving.store.feed_step(input_ids, inputs_embeds, query_start_loc, seq_lens, row_slot)

    def flush_record(self) -> None:
        """Record the held rows now (before a request takes a slot: the held rows may name a slot it reuses)."""
        held = self.serving.take_held_record()
        if held is not None:
            self._record(*held)

    def _record(self, hidden_states, row_slot, next_pos) -> None:
        """The head's latent for each sampled row (every mode; the row's own is chosen in the store)."""
        latents = torch.stack([self.latent_head(hidden_states, mode) for mode in FEEDBACK_CODES])
        self.serving.store.record(hidden_states, row_slot, next_pos, latents)

    def _record_and_feed(self, hidden_states, record_slot, next_pos, input_ids, inputs_embeds, query_start_loc,
                         seq_lens, row_slot):
        self._record(hidden_states, record_slot, next_pos)
        return self.serving.store.feed_step(input_ids, inputs_embeds, query_start_loc, seq_lens, row_slot)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        serving = self.serving
        if serving.step_armed and input_ids is not None and inputs_embeds is not None and intermediate_tensors is None:
            serving.step_armed = False  # V1: one real step per `update_state`; dummy runs are not armed
            metadata = _attention_metadata()
            if metadata is not None:
                num_rows = metadata.query_start_loc.shape[0] - 1
                seq_lens, row_slot = metadata.seq_lens[:num_rows], serving.row_slot[:num_rows]
                inputs_embeds = self.feed(input_ids, inputs_embeds, metadata.query_start_loc, seq_lens, row_slot)
                serving.record_rows = (row_slot, seq_lens)
        if inputs_embeds is not None and intermediate_tensors is None and not kwargs and self._decoder_direct:
            return self._decode(inputs_embeds, positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    @property
    def _decoder_direct(self) -> bool:
        """The step can go straight to the compiled decoder: one pipeline stage (always, PP is refused) and no
        auxiliary hidden states asked for (EAGLE-3, refused with speculative decoding)."""
        return not self._output_aux_hidden_states_kwargs and self.pp_group.world_size == 1

    def _decode(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N, H) embeddings, (3, N) M-RoPE positions -> (N, H) final hidden states, by vLLM's compiled decoder
        (transformers' Qwen2.5-VL text model) alone. vLLM's merges the image embeddings in `embed_input_ids`, so
        transformers' outer `Qwen2_5_VLModel.forward` (which only passes the embeddings and positions on, behind
        output wrappers) and the backend's per-step config reads are skipped: a fixed cost per step that is most of
        a small model's step on a CPU."""
        outputs = self.model.language_model(
            input_ids=None, inputs_embeds=inputs_embeds[None], position_ids=positions[:, None].contiguous(),
            use_cache=False, return_dict=False)
        return outputs[0][0]

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if (multimodal_embeddings is None or len(multimodal_embeddings) == 0) and not self._has_oov_mm_tokens:
            # A text-only step (every decode step): the token embedding alone. vLLM's multimodal path reaches the
            # same lookup through four wrappers, a fixed cost per step.
            return self.model.get_input_embeddings()(input_ids)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def get_language_model(self) -> torch.nn.Module:
        # The backend builds a wrapper class on every call, and vLLM's `embed_input_ids` calls it every step.
        language_model = self.__dict__.get("_gap_language_model")
        if language_model is None:
            language_model = super().get_language_model()
            self.__dict__["_gap_language_model"] = language_model  # not a submodule: it shares this module's state
        return language_model

    def compute_logits(self, hidden_states, *args, **kwargs):
        serving = self.serving
        rows = serving.record_rows
        if rows is not None and hidden_states.shape[0] == rows[0].shape[0]:
            serving.record_rows = None
            # Recorded at the next feed, in the same call (one call a step fewer): held in persistent buffers.
            self.flush_record()
            serving.hold_record(hidden_states, *rows)
        return super().compute_logits(hidden_states, *args, **kwargs)

    @classmethod
    def get_model_state_cls(cls):
        """Model Runner V2's per-request state for GAP (feed and slots); V1 never calls this."""
        return gap_model_state_cls()


def gap_model_state_cls():
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    class GapModelState(DefaultModelState):
        """Model Runner V2: `DefaultModelState` (multimodal embeddings, M-RoPE) plus GAP's slots and feed. Runs
        eagerly before the captured forward; the request-state index -> slot map is a device tensor."""

        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            self.serving = model.serving
            log_serving_mode(vllm_config, model.serving, runner="V2")

        def add_request(self, req_index, new_req_data):
            super().add_request(req_index, new_req_data)
            self.serving.flush_record()
            prompt = list(new_req_data.prompt_token_ids or [])
            prefill = list(new_req_data.prefill_token_ids or prompt)
            slot = self.serving.admit(new_req_data.req_id, new_req_data.sampling_params, prompt, prefill[len(prompt):])
            self.serving.index_to_slot[req_index] = slot

        def remove_request(self, req_id):
            super().remove_request(req_id)
            self.serving.store.release(req_id)

        def prepare_inputs_embeds(self, scheduled_encoder_inputs, input_batch, req_states):
            inputs_embeds = super().prepare_inputs_embeds(scheduled_encoder_inputs, input_batch, req_states)
            num_tokens, num_reqs = input_batch.num_tokens, input_batch.num_reqs
            seq_lens = input_batch.seq_lens[:num_reqs]
            # Into a persistent buffer (the V1 map's), so the compiled steps see the same kind of tensor on both
            # runners (a view of a persistent buffer).
            row_slot = self.serving.row_slot[:num_reqs]
            row_slot.copy_(self.serving.index_to_slot[input_batch.idx_mapping[:num_reqs]])
            inputs_embeds[:num_tokens] = self.model.feed(
                input_batch.input_ids[:num_tokens], inputs_embeds[:num_tokens],
                input_batch.query_start_loc[: num_reqs + 1], seq_lens, row_slot)
            self.serving.record_rows = (row_slot, seq_lens)  # one logits row per request: no speculative decoding
            return inputs_embeds

    return GapModelState


def log_serving_mode(vllm_config, serving, runner: str) -> None:
    compilation = vllm_config.compilation_config
    store = serving.store
    logger.info(
        "gap_vllm: backbone Transformers (transformers' Qwen2.5-VL modules), runner %s, compilation %s, cudagraph "
        "mode %s, latent store %d slots x %d latents on %s.", runner, getattr(compilation.mode, "name", compilation.mode),
        getattr(compilation.cudagraph_mode, "name", compilation.cudagraph_mode), store.num_slots, store.capacity,
        store.device,
    )
