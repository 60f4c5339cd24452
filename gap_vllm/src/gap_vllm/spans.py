"""Per-request latent state and the span rule, as a vLLM V1 logits processor.

`GapLatentSpanProcessor` is loaded through the `vllm.logits_processors` entry point in every worker. It

- keeps one `RequestState` per request in the persistent batch (moved with its row on every batch change), with the
  request's options from `SamplingParams.extra_args` (`latent_intervention`, `max_latent_spans`, `latent_feedback`)
  and the latents fed so far (for replay after preemption);
- enforces the checkpoint's span rule on the logits: `fixed` forces K `<|latent_pad|>` slots after
  `<|latent_start|>`, then `<|latent_end|>`; `sampled_end` lets the end token be chosen (it ends the span when it is
  what the request would have sampled), forced after the maximum; `drop` / `max_latent_spans` forbid opening a span.

The GAP model of the same worker reads these states (row by row, in batch order) to know what each request is fed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .config import FEEDBACK_MODES, INTERVENTIONS, SPAN_RULES, GapSpec

logger = logging.getLogger("gap_vllm")

OPTION_KEYS = ("latent_intervention", "max_latent_spans", "latent_feedback", "latent_span_rule", "latent_max_tokens")
_PROCESSORS: dict[str, "GapLatentSpanProcessor"] = {}
_PARKED_LIMIT = 4096  # requests out of the batch (preempted, unscheduled or finished) whose latents are kept


def processor_for(vllm_config) -> "GapLatentSpanProcessor | None":
    """The span processor built for this engine's worker (same `VllmConfig`)."""
    return _PROCESSORS.get(getattr(vllm_config, "instance_id", ""))


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


class RequestState:
    """One request's latent state. `latents[j]` is what is fed at sequence index j (a `<|latent_pad|>` slot): it is
    computed when the state at j - 1 is, and kept so that a preempted request replays the same vectors."""

    __slots__ = ("params", "prompt_len", "output", "seen", "slots_left", "end_due", "spans", "options",
                 "greedy", "temperature", "invalid", "latents", "plain", "span_rule", "max_latents")

    def __init__(self, spec: GapSpec, params, prompt_ids, output_ids):
        self.params = params
        self.options = parse_options(getattr(params, "extra_args", None))
        self.greedy = float(getattr(params, "temperature", 1.0)) < 1e-5
        self.temperature = max(float(getattr(params, "temperature", 1.0)), 1e-5)
        prompt = list(prompt_ids or [])
        self.prompt_len = len(prompt)
        self.output = output_ids
        self.seen = 0
        self.latents: dict[int, torch.Tensor] = {}
        # Sequence indices of `<|latent_pad|>` tokens generated outside a span (a model may sample the slot token
        # freely): they are plain tokens, fed their token embedding, as in GAP generate.
        self.plain: set[int] = set()
        # A prompt may end in `<|latent_start|>` (it then opens a span); latent slots inside a prompt cannot be fed
        # (no vector is given for them), so such a request is ended at once.
        self.invalid = spec.pad_id in prompt
        # The checkpoint's span rule, unless the request names one (`latent_span_rule`, `latent_max_tokens`).
        self.span_rule = self.options["span_rule"] or spec.span_rule
        if self.span_rule == "sampled_end":
            self.max_latents = self.options["max_tokens"] or (
                spec.max_latents if spec.span_rule == "sampled_end" else spec.num_latent_tokens)
        else:
            self.max_latents = spec.num_latent_tokens
        self.spans = sum(t == spec.start_id for t in prompt)
        self.slots_left = self.max_latents if prompt and prompt[-1] == spec.start_id else 0
        self.end_due = False

    def feedback(self, spec: GapSpec) -> str:
        return self.options["feedback"] or spec.feedback

    def advance(self, spec: GapSpec):
        """Fold the tokens sampled since the last call into the span state (GAP generate's rule).

        The state follows the tokens actually sampled, not the ones this processor forced: a logits processor that
        runs after it (vLLM applies `LLM(logits_processors=...)` after the entry-point ones) can override a forced
        token. A `<|latent_start|>` sampled while no span may open (`drop`, `max_latent_spans` reached) opens none
        (GAP generate: "drop and max_latent_spans win over every logits processor"); a `<|latent_pad|>` outside a
        span is a plain token."""
        first = self.seen
        new = self.output[first:]
        self.seen = len(self.output)
        for offset, token in enumerate(new):
            slot = False
            if self.slots_left > 0:
                if token == spec.pad_id:
                    self.slots_left -= 1
                    self.end_due = self.slots_left == 0
                    slot = True
                else:  # the end token (sampled_end), or anything a stop condition let through
                    self.slots_left, self.end_due = 0, False
            elif self.end_due:
                self.end_due = False
            elif token == spec.start_id and self.can_open():
                self.slots_left, self.spans = self.max_latents, self.spans + 1
            if token == spec.pad_id and not slot:
                self.plain.add(self.prompt_len + first + offset)

    def can_open(self) -> bool:
        if self.options["intervention"] == "drop":
            return False
        return self.options["max_spans"] is None or self.spans < self.options["max_spans"]


class GapLatentSpanProcessor(LogitsProcessor):
    """vLLM V1 logits processor (interface `vllm.v1.sample.logits_processor.LogitsProcessor`)."""

    @classmethod
    def validate_params(cls, sampling_params):
        parse_options(getattr(sampling_params, "extra_args", None))

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        hf_config = vllm_config.model_config.hf_config
        self.spec = GapSpec.from_hf_config(hf_config) if _is_gap(hf_config) else None
        self.rows: list[RequestState | None] = []
        self.parked: OrderedDict[int, RequestState] = OrderedDict()
        self.eos_ids = _eos_ids(vllm_config)
        self.resumed = 0  # requests that re-entered the batch with latents already fed (after a preemption)
        if self.spec is not None:
            _PROCESSORS[getattr(vllm_config, "instance_id", "")] = self

    def is_argmax_invariant(self) -> bool:
        return False  # it forces tokens

    # ---- batch bookkeeping ----------------------------------------------------------------------------
    def _set(self, index: int, state):
        if index >= len(self.rows):
            self.rows.extend([None] * (index + 1 - len(self.rows)))
        self.rows[index] = state

    def update_state(self, batch_update) -> None:
        if self.spec is None:
            return
        if batch_update is not None:
            for index in batch_update.removed:
                state = self.rows[index] if index < len(self.rows) else None
                if state is not None:  # finished or out of the batch for now (preempted): keep its latents
                    self.parked[id(state.params)] = state
                    while len(self.parked) > _PARKED_LIMIT:
                        self.parked.popitem(last=False)
                    self.rows[index] = None
            for index, params, prompt_ids, output_ids in batch_update.added:
                state = self.parked.pop(id(params), None)
                if state is not None and state.params is params:  # back in the batch (e.g. resumed)
                    self.resumed += bool(state.latents)
                    state.output = output_ids
                    state.seen = min(state.seen, len(output_ids))
                else:
                    state = RequestState(self.spec, params, prompt_ids, output_ids)
                    if output_ids and self.spec.pad_id in output_ids:
                        raise RuntimeError(
                            "gap_vllm: a request with latent spans re-entered the batch but its fed latents were "
                            "not kept (more than %d requests out of the batch at once); continuing would feed "
                            "plain slot-token embeddings at its latent slots. Lower max_num_seqs or give the KV "
                            "cache more room." % _PARKED_LIMIT
                        )
                    if state.invalid:
                        logger.error(
                            "gap_vllm: a prompt contains %s slots; a prompt cannot carry latent vectors, so the "
                            "request is ended at once (send the text without its latent spans).",
                            "<|latent_pad|>",
                        )
                self._set(index, state)
            for a, b, direction in batch_update.moved:
                if max(a, b) >= len(self.rows):
                    self.rows.extend([None] * (max(a, b) + 1 - len(self.rows)))
                if direction == MoveDirectionality.SWAP:
                    self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
                else:
                    self.rows[b], self.rows[a] = self.rows[a], None
            del self.rows[batch_update.batch_size:]
        for state in self.rows:
            if state is not None:
                state.advance(self.spec)

    # ---- the span rule ----------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec is None or not self.rows:
            return logits
        forced_rows, forced_tokens, blocked, choose_end = [], [], [], []
        for row, state in enumerate(self.rows[: logits.shape[0]]):
            if state is None:
                continue
            if state.invalid:
                if self.eos_ids:
                    forced_rows.append(row), forced_tokens.append(self.eos_ids[0])
            elif state.slots_left > 0:
                if state.span_rule == "sampled_end":
                    choose_end.append(row)
                else:
                    forced_rows.append(row), forced_tokens.append(spec.pad_id)
            elif state.end_due:
                forced_rows.append(row), forced_tokens.append(spec.end_id)
            elif not state.can_open():
                blocked.append(row)
        if blocked:
            logits[blocked, spec.start_id] = float("-inf")
        for row in choose_end:
            state = self.rows[row]
            scores = logits[row]
            if state.greedy:  # the end token ends the span iff it is what greedy search would pick
                token = spec.end_id if int(scores.argmax()) == spec.end_id else spec.pad_id
                forced_rows.append(row), forced_tokens.append(token)
            else:  # sample "end" with its probability under the request's temperature, otherwise a slot
                p_end = torch.softmax(scores.float() / state.temperature, dim=-1)[spec.end_id].clamp(1e-12, 1 - 1e-7)
                scores.fill_(float("-inf"))
                scores[spec.end_id] = state.temperature * torch.log(p_end)
                scores[spec.pad_id] = state.temperature * torch.log1p(-p_end)
        if forced_rows:
            logits[forced_rows] = float("-inf")
            logits[forced_rows, forced_tokens] = 0.0
        return logits


def _is_gap(hf_config) -> bool:
    return getattr(hf_config, "latent_start_token_id", None) is not None and hasattr(hf_config, "num_latent_tokens")


def _eos_ids(vllm_config) -> list[int]:
    hf_config = vllm_config.model_config.hf_config
    text = getattr(hf_config, "text_config", hf_config)
    eos = getattr(text, "eos_token_id", None)
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])


