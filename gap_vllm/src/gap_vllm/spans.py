"""The span rule as a logits processor both of vLLM's model runners load, and the worker's serving state.

`GapLatentSpanProcessor` is registered under the `vllm.logits_processors` entry point. It implements both
interfaces: V1 (`vllm.v1.sample.logits_processor.LogitsProcessor`: `update_state(BatchUpdate)` + `apply(logits)`)
and Model Runner V2 (`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`: `add_request` +
`apply(logits, ctx)`), so a vLLM with the plugin installed starts on either runner. For a model that is not a GAP
checkpoint it does nothing.

The span state itself lives on the device in the model's `LatentStore` (`latent_store.py`), shared through
`GapServing` (one per engine in a worker process): the processor only maps logits rows to store slots
(`apply_span_rule`). On the V1 runner it also follows the persistent batch (requests added, removed, moved) and
gives each request its slot; on V2 the model state (`model.GapModelState`) does that.
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor import MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .config import FEEDBACK_MODES, INTERVENTIONS, SPAN_RULES, GapSpec
from .latent_store import LatentStore, RequestOptions, SpanTokens
from .processing import is_gap_config, refuse_structured_outputs

logger = logging.getLogger("vllm.gap_vllm")

OPTION_KEYS = ("latent_intervention", "max_latent_spans", "latent_feedback", "latent_span_rule", "latent_max_tokens")
_SERVING: dict[str, "GapServing"] = {}


def serving_for(vllm_config) -> "GapServing | None":
    """The serving state the GAP model of this engine created in this process (None: not a GAP model)."""
    return _SERVING.get(getattr(vllm_config, "instance_id", ""))


def parse_options(extra_args: dict | None) -> dict:
    """Validated GAP options of one request (`SamplingParams.extra_args`, the server's `vllm_xargs`)."""
    extra = extra_args or {}
    intervention = extra.get("latent_intervention")
    if intervention == "none":
        intervention = None
    if intervention not in INTERVENTIONS:
        raise ValueError(f"latent_intervention must be one of {INTERVENTIONS}; got {intervention!r}.")
    max_spans = extra.get("max_latent_spans")
    if max_spans is not None and (isinstance(max_spans, bool) or not isinstance(max_spans, int) or max_spans < 0):
        raise ValueError(f"max_latent_spans must be an integer >= 0; got {max_spans!r}.")
    feedback = extra.get("latent_feedback")
    if feedback is not None and feedback not in FEEDBACK_MODES:
        raise ValueError(f"latent_feedback must be one of {FEEDBACK_MODES}; got {feedback!r}.")
    rule = extra.get("latent_span_rule")
    if rule is not None and rule not in SPAN_RULES:
        raise ValueError(f"latent_span_rule must be one of {SPAN_RULES}; got {rule!r}.")
    max_tokens = extra.get("latent_max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"latent_max_tokens must be an integer >= 1; got {max_tokens!r}.")
    unknown = sorted(k for k in extra if k.startswith("latent_") and k not in OPTION_KEYS)
    if unknown:
        raise ValueError(f"Unknown GAP option(s) {unknown}; known: {OPTION_KEYS}.")
    return dict(intervention=intervention, max_spans=max_spans, feedback=feedback, span_rule=rule,
                max_tokens=max_tokens)


def request_options(spec: GapSpec, params) -> RequestOptions:
    """A request's options (`SamplingParams.extra_args`) resolved against the checkpoint's defaults."""
    options = parse_options(getattr(params, "extra_args", None))
    span_rule = options["span_rule"] or spec.span_rule
    if span_rule == "sampled_end":
        max_latents = options["max_tokens"] or (
            spec.max_latents if spec.span_rule == "sampled_end" else spec.num_latent_tokens)
    else:
        max_latents = spec.num_latent_tokens
    temperature = getattr(params, "temperature", 1.0)
    return RequestOptions(
        feedback=options["feedback"] or spec.feedback, intervention=options["intervention"],
        max_spans=options["max_spans"], max_latents=max_latents, sampled_end=span_rule == "sampled_end",
        temperature=1.0 if temperature is None else float(temperature),
    )


class GapServing:
    """One engine's serving state in a worker process: the latent store and the maps from the runner's rows (V1:
    persistent-batch rows; V2: request-state indices) to store slots, as device tensors.

    `record_rows` arms the next `compute_logits` (the one whose rows the sampler uses): the model sets it where a
    real step starts (V1: the forward after the processor's `update_state`; V2: `prepare_inputs_embeds`), and
    `compute_logits` consumes it, so prompt-logprob and dummy calls record nothing. It holds the sampled rows'
    hidden states, slots and next positions in persistent buffers (`hold_record`); the next feed records them in the
    same call, or `flush_record` (the model's) does before a request takes a slot."""

    def __init__(self, spec: GapSpec, store: LatentStore, max_rows: int, vllm_config):
        self.spec, self.store = spec, store
        self.span_rule = store.apply_span_rule  # compiled by the model in vLLM's compiled mode
        self.flush_record = lambda: None  # the model's
        device = store.device
        self.record_hidden = torch.zeros(max_rows, store.hidden_size, dtype=store.vectors.dtype, device=device)
        self.record_slot = torch.full((max_rows,), store.scratch, dtype=torch.long, device=device)
        self.record_pos = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.recorded = 0  # rows held for recording
        scratch = torch.full((max_rows,), store.scratch, dtype=torch.long, device=device)
        self.row_slot = scratch  # V1: persistent-batch row -> slot
        self.index_to_slot = scratch.clone()  # V2: request-state index -> slot
        self.row_slot_host = [store.scratch] * max_rows
        self.row_keys: list = [None] * max_rows
        self.params: dict = {}  # V1 keys are id(SamplingParams): the objects are held so an id is not reused
        self.step_armed = False
        self.record_rows: tuple | None = None
        self.resumed = 0  # requests that re-entered the batch with their history (after preemption)
        _SERVING[getattr(vllm_config, "instance_id", "")] = self

    def hold_record(self, hidden_states: torch.Tensor, row_slot: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Keep (R, H) sampled hidden states, their (R,) slots and next positions until the next feed (the runner
        reuses its own buffers for the next step's layout)."""
        rows = hidden_states.shape[0]
        self.record_hidden[:rows].copy_(hidden_states)
        self.record_slot[:rows].copy_(row_slot)
        self.record_pos[:rows].copy_(next_pos)
        self.recorded = rows

    def recorded_rows(self, rows: int) -> tuple:
        return self.record_hidden[:rows], self.record_slot[:rows], self.record_pos[:rows]

    def take_held_record(self) -> tuple | None:
        """The held rows (views of the buffers), once; None when nothing is held."""
        if not self.recorded:
            return None
        held, self.recorded = self.recorded_rows(self.recorded), 0
        return held

    def admit(self, key, params, prompt, output) -> int:
        output = [t for t in (output or []) if t >= 0]  # async scheduling: -1 placeholders
        resumed = key in self.store.slot_table.parked
        slot = self.store.admit(key, request_options(self.spec, params), list(prompt or []), output)
        self.resumed += resumed
        if not resumed and output and self.spec.pad_id in output:
            logger.error("gap_vllm: a request with latent spans re-entered the batch after its latents were "
                         "evicted from the store (more requests out of the batch than it keeps); it is ended. "
                         "Lower max_num_seqs or give the KV cache more room.")
        return slot

    # ---- V1 runner: follow the persistent batch ---------------------------------------------------------------
    def update_v1(self, batch_update) -> None:
        """Apply a V1 `BatchUpdate` (removed, added, moved, in that order) to the row -> slot map."""
        store, keys, slots = self.store, self.row_keys, self.row_slot_host
        for index in batch_update.removed:
            if keys[index] is not None:
                store.release(keys[index])
            keys[index], slots[index] = None, store.scratch
        if batch_update.added:
            self.flush_record()
        for index, params, prompt, output in batch_update.added:
            if keys[index] is not None:
                store.release(keys[index])
            key = id(params)
            self.params[key] = params
            keys[index], slots[index] = key, self.admit(key, params, prompt, output)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                keys[a], keys[b] = keys[b], keys[a]
                slots[a], slots[b] = slots[b], slots[a]
            else:
                # vLLM fills a removed row by moving the last one into it (`condense`) and then leaves that row out
                # of `removed`: the request it held has left the batch.
                if keys[b] is not None and keys[b] != keys[a]:
                    store.release(keys[b])
                keys[b], slots[b] = keys[a], slots[a]
                keys[a], slots[a] = None, store.scratch
        for index in range(batch_update.batch_size, len(keys)):
            if keys[index] is not None:
                store.release(keys[index])
            keys[index], slots[index] = None, store.scratch
        known = store.slot_table.live.keys() | store.slot_table.parked.keys()
        self.params = {key: params for key, params in self.params.items() if key in known}
        self.row_slot.copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)


class GapLatentSpanProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """The span rule for both model runners (constructed as `(vllm_config, device, is_pin_memory)` by V1 and
    `(vllm_config, req_states)` by V2). A no-op for models that are not GAP checkpoints."""

    @classmethod
    def validate_params(cls, sampling_params):
        parse_options(getattr(sampling_params, "extra_args", None))
        refuse_structured_outputs(sampling_params)

    def __init__(self, vllm_config, *runner_args):
        self.vllm_config = vllm_config
        self.runner = "V2" if len(runner_args) == 1 else "V1"
        self.is_gap = is_gap_config(vllm_config.model_config.hf_config)

    def serving(self) -> GapServing | None:
        # The processor is built before the model (which creates the serving state) is loaded.
        return serving_for(self.vllm_config) if self.is_gap else None

    def is_argmax_invariant(self) -> bool:
        return False  # it forces tokens

    def add_request(self, req_idx: int, sampling_params) -> bool:  # V2
        return self.is_gap

    def update_state(self, batch_update) -> None:  # V1, once per step before the forward
        serving = self.serving()
        if serving is None:
            return
        if batch_update is not None:
            serving.update_v1(batch_update)
        serving.step_armed = True

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        serving = self.serving()
        if serving is None:
            return logits
        row_slot = serving.row_slot[: logits.shape[0]]  # V1: logits rows are persistent-batch rows
        if ctx is not None:  # V2: rows map to request-state indices (into the same persistent buffer, which the
            row_slot.copy_(serving.index_to_slot[ctx.expanded_idx_mapping])  # compiled step was warmed up with)
        return serving.span_rule(logits, row_slot)


def eos_id(vllm_config) -> int:
    """The checkpoint's first EOS id (-1: none)."""
    hf_config = vllm_config.model_config.hf_config
    text = getattr(hf_config, "text_config", hf_config)
    eos = getattr(text, "eos_token_id", None)
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return eos[0] if eos else -1
