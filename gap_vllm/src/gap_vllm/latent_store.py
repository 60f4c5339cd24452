"""The device side of GAP serving: latent store, feed, record and span rule, in torch alone.

vLLM's hooks (`model.py`, `spans.py`) are thin adapters around this module; it imports torch only, so it is tested
alone (compiled with `fullgraph=True`, on fake tensors, traced with `make_fx` and replayed).

Every per-step method (`fold`, `feed`, `feed_step`, `record`, `apply_span_rule`) is a fixed sequence of tensor ops on buffers
allocated once: no `.item()`, `.tolist()`, `nonzero`, Python branch on a tensor value or per-request loop, so it
can run inside a captured CUDA graph and under asynchronous scheduling. Host work happens only when the batch
changes (`admit`, `release`): a slot per request, its options written in one copy.

State is indexed by a stable *slot* (one per request, kept while the request is preempted; a scratch slot
`num_slots` absorbs padded rows):

- history: `vectors (P+1, L, H)`, the latents fed so far at sequence positions `vector_pos (P+1, L)` (-1: empty);
- pending: `pending_vector (P+1, H)` for position `state[:, PENDING_POS]`, written by `record` from the last
  sampled row's hidden state; `feed` moves it into the history when a latent slot at that position is fed;
- span state and options: `state (P+1, NUM_FIELDS)` (int64 columns below) and `temperature (P+1,)`.

A `<|latent_pad|>` token at position p is fed the history's vector for p if there is one (so replay after
preemption and chunked prefill are exact by construction), else the pending vector when the span rule made it a
latent slot (the span state says so when the token was folded); otherwise (a pad sampled outside a span) it keeps
its token embedding, as in GAP `generate`. A prompt's span state (its spans, whether it ends in
`<|latent_start|>`) is written at `admit`; the per-step fold reads output tokens only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

FEEDBACK_CODES = {"pca": 0, "ema_norm": 1, "raw": 2}
INTERVENTION_CODES = {None: 0, "zero": 1, "drop": 2}

# Columns of `LatentStore.state`.
(PROMPT_LEN, FOLDED, SLOTS_LEFT, END_DUE, SPANS, INVALID, EVICTED, FEEDBACK, INTERVENTION, MAX_SPANS,
 MAX_LATENTS, SAMPLED_END, GREEDY, COUNT, PENDING_POS) = range(15)
NUM_FIELDS = 15


@dataclass(frozen=True)
class SpanTokens:
    """The token ids the span rule uses (`eos` -1 where the checkpoint names none)."""

    pad: int
    start: int
    end: int
    eos: int = -1


@dataclass(frozen=True)
class RequestOptions:
    """One request's GAP options, resolved against the checkpoint's defaults (`spans.parse_options` builds it)."""

    feedback: str
    intervention: str | None
    max_spans: int | None
    max_latents: int
    sampled_end: bool
    temperature: float  # < 1e-5: greedy


class SlotTable:
    """Stable store slots for requests (host side, touched only when the batch changes).

    A request keeps its slot while it is out of the batch (preempted, or finished: the runner does not say which),
    so a resumed request finds its history. Parked slots are reused least-recently-parked first once no free slot
    is left; a request resumed after its slot was reused cannot be fed its latents and is ended (`evicted`)."""

    def __init__(self, num_slots: int):
        self.free = list(range(num_slots - 1, -1, -1))
        self.live: dict = {}
        self.parked: OrderedDict = OrderedDict()

    def admit(self, key) -> tuple[int, bool]:
        """`(slot, resumed)` for a request entering the batch."""
        if key in self.live:
            return self.live[key], True
        if key in self.parked:
            slot = self.parked.pop(key)
            self.live[key] = slot
            return slot, True
        if self.free:
            slot = self.free.pop()
        elif self.parked:
            slot = self.parked.popitem(last=False)[1]
        else:
            raise RuntimeError("gap_vllm: no latent store slot left (more live requests than the store holds).")
        self.live[key] = slot
        return slot, False

    def release(self, key) -> None:
        slot = self.live.pop(key, None)
        if slot is not None:
            self.parked[key] = slot


class LatentStore:
    """Latent history, pending latents and span state of up to `num_slots` requests (shapes in the module doc)."""

    def __init__(self, num_slots: int, capacity: int, hidden_size: int, tokens: SpanTokens, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity (latents kept per request) must be >= 1; got {capacity}.")
        self.num_slots, self.capacity, self.hidden_size, self.tokens = num_slots, capacity, hidden_size, tokens
        rows = num_slots + 1  # + the scratch slot
        self.vectors = torch.zeros(rows, capacity, hidden_size, dtype=dtype, device=device)
        self.vector_pos = torch.full((rows, capacity), -1, dtype=torch.long, device=device)
        self.pending_vector = torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self.state = torch.zeros(rows, NUM_FIELDS, dtype=torch.long, device=device)
        self.state[:, PENDING_POS] = -1
        self.state[:, FOLDED] = -1
        self.temperature = torch.ones(rows, dtype=torch.float32, device=device)
        self.slot_table = SlotTable(num_slots)

    @property
    def scratch(self) -> int:
        return self.num_slots

    @property
    def device(self) -> torch.device:
        return self.state.device

    # ---- batch changes (host) ----------------------------------------------------------------------------------
    def admit(self, key, options: RequestOptions, prompt: list[int], output: list[int] | None = None) -> int:
        """Give a request entering the batch its slot: a new request's state is written (one copy); a resumed one
        keeps its history. `output`: tokens it already has (a resumed request); -1 placeholders are ignored."""
        slot, resumed = self.slot_table.admit(key)
        if resumed:
            return slot
        tokens = self.tokens
        row = [0] * NUM_FIELDS
        row[PROMPT_LEN] = len(prompt)
        row[FOLDED] = -1
        row[INVALID] = int(tokens.pad in prompt)
        # The prompt's spans, and a prompt ending in <|latent_start|> opens one (the fold sees output tokens only).
        row[SPANS] = prompt.count(tokens.start)
        row[SLOTS_LEFT] = options.max_latents if prompt and prompt[-1] == tokens.start else 0
        # A request that has output with latent slots but no history lost it (its slot was reused): end it.
        row[EVICTED] = int(bool(output) and tokens.pad in output)
        row[FEEDBACK] = FEEDBACK_CODES[options.feedback]
        row[INTERVENTION] = INTERVENTION_CODES[options.intervention]
        row[MAX_SPANS] = -1 if options.max_spans is None else options.max_spans
        row[MAX_LATENTS] = options.max_latents
        row[SAMPLED_END] = int(options.sampled_end)
        row[GREEDY] = int(options.temperature < 1e-5)
        row[PENDING_POS] = -1
        self.write_rows([slot], [row], [max(options.temperature, 1e-5)])
        return slot

    def release(self, key) -> None:
        self.slot_table.release(key)

    def write_rows(self, slots: list[int], rows: list[list[int]], temperatures: list[float]) -> None:
        index = torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
        self.state.index_copy_(0, index, torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True))
        self.temperature.index_copy_(0, index, torch.tensor(temperatures, dtype=torch.float32).to(self.device))
        self.vector_pos.index_fill_(0, index, -1)

    # ---- per step (device, fixed shapes) -----------------------------------------------------------------------
    @staticmethod
    def _write(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        """`target[index] = values` along dim 0, without broadcasting: compiled with dynamic shapes, an indexed
        assignment would specialize on one row (broadcast or not) and recompile when the batch size crosses 1.
        Padded rows all name the scratch slot: which of their writes lands there does not matter."""
        target.index_copy_(0, index, values)

    def _can_open(self, state: torch.Tensor) -> torch.Tensor:
        """(n, NUM_FIELDS) gathered state rows -> (n,) bool: may a `<|latent_start|>` open a span now (`drop`,
        `max_latent_spans`, and room for a whole span in the history)."""
        max_spans = state[:, MAX_SPANS]
        return ((state[:, INTERVENTION] != INTERVENTION_CODES["drop"])
                & ((max_spans < 0) | (state[:, SPANS] < max_spans))
                & (state[:, COUNT] + state[:, MAX_LATENTS] <= self.capacity))

    def fold(self, token_ids: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
             row_slot: torch.Tensor) -> torch.Tensor:
        """Fold this forward's new output tokens into the span state (GAP generate's rule) and return `(R,) bool`:
        which rows' new token is a latent slot (to be fed the pending vector).

        token_ids: (N,) the flattened batch; query_start_loc (R+1,), seq_lens (R,): its layout (rows may be empty:
        padding); row_slot (R,): each row's store slot. A request has at most one output token that no forward has
        seen (the last one sampled), and it ends its sequence, so only each row's last token can be new: it is
        folded when it lies past the prompt (whose spans `admit` counted) and past the slot's `FOLDED` mark (a
        replayed prefix is not folded again)."""
        tokens = self.tokens
        num_rows = seq_lens.shape[0]
        ends = query_start_loc[1:num_rows + 1]
        row_valid = ends > query_start_loc[:num_rows]
        token = token_ids[(ends - 1).clamp(min=0)].long()
        position = seq_lens.long() - 1
        state = self.state[row_slot]
        folded = state[:, FOLDED]
        has_output = row_valid & (position >= state[:, PROMPT_LEN]) & (position > folded)
        slots_left, end_due = state[:, SLOTS_LEFT], state[:, END_DUE] > 0
        zeros = torch.zeros_like(slots_left)
        in_span = slots_left > 0
        is_pad = token == tokens.pad
        is_slot = has_output & in_span & is_pad
        opens = has_output & ~in_span & ~end_due & (token == tokens.start) & self._can_open(state)
        out_slots = torch.where(in_span, torch.where(is_pad, slots_left - 1, zeros),
                                torch.where(opens, state[:, MAX_LATENTS], zeros))
        self._write(self.state[:, SLOTS_LEFT], row_slot, torch.where(has_output, out_slots, slots_left))
        self._write(self.state[:, END_DUE], row_slot,
                    torch.where(has_output, in_span & is_pad & (slots_left == 1), end_due).long())
        self._write(self.state[:, SPANS], row_slot, state[:, SPANS] + opens.long())
        self._write(self.state[:, FOLDED], row_slot, torch.where(row_valid, torch.maximum(folded, position), folded))
        return is_slot

    def feed(self, inputs_embeds: torch.Tensor, token_ids: torch.Tensor, query_start_loc: torch.Tensor,
             seq_lens: torch.Tensor, row_slot: torch.Tensor, row_is_slot: torch.Tensor) -> torch.Tensor:
        """(N, H) embeddings -> (N, H) with every latent slot's vector in place: the history's vector for its
        position (a replayed prefix), else, for a row's new slot token (`row_is_slot`, from `fold`), the pending
        vector recorded for that position, which then joins the history."""
        row, position, valid = token_layout(query_start_loc, seq_lens, token_ids.shape[0])
        slot = torch.where(valid, row_slot[row], torch.full_like(row, self.scratch))
        is_pad = valid & (token_ids == self.tokens.pad)
        matches = (self.vector_pos[slot] == position[:, None]) & is_pad[:, None]  # (N, L)
        from_history = matches.any(dim=1)
        history_index = matches.long().argmax(dim=1)
        # A new position is in no history (history positions have all been folded), so the pending vector is the
        # only candidate there.
        row_position = seq_lens.long() - 1
        commit = row_is_slot & (self.state[row_slot, PENDING_POS] == row_position)  # (R,)
        from_pending = valid & commit[row] & (position == row_position[row])
        vectors = torch.where(from_history[:, None], self.vectors[slot, history_index], self.pending_vector[slot])
        fed = (from_history | from_pending)[:, None]
        inputs_embeds = torch.where(fed, vectors.to(inputs_embeds.dtype), inputs_embeds)
        # The pending vector joins the history of each row that was fed it.
        count = self.state[row_slot, COUNT]
        at = count.clamp(max=self.capacity - 1)
        entry = row_slot * self.capacity + at
        vectors, vector_pos = self.vectors.view(-1, self.hidden_size), self.vector_pos.view(-1)
        self._write(vectors, entry, torch.where(commit[:, None], self.pending_vector[row_slot], vectors[entry]))
        self._write(vector_pos, entry, torch.where(commit, row_position, vector_pos[entry]))
        self._write(self.state[:, COUNT], row_slot, count + commit.long())
        return inputs_embeds

    def feed_step(self, token_ids: torch.Tensor, inputs_embeds: torch.Tensor, query_start_loc: torch.Tensor,
                  seq_lens: torch.Tensor, row_slot: torch.Tensor) -> torch.Tensor:
        """One forward's feed: `fold`, then `feed` (shapes there)."""
        row_is_slot = self.fold(token_ids, query_start_loc, seq_lens, row_slot)
        return self.feed(inputs_embeds, token_ids, query_start_loc, seq_lens, row_slot, row_is_slot)

    def record(self, hidden_states: torch.Tensor, row_slot: torch.Tensor, next_pos: torch.Tensor,
               latents_by_mode: torch.Tensor) -> None:
        """Write each sampled row's latent as its slot's pending vector for position `next_pos` (the first time
        that position is reached).

        hidden_states: (R, H) final hidden states of the rows the sampler uses; row_slot, next_pos: (R,);
        latents_by_mode: (3, R, H) the head's output in modes pca / ema_norm / raw (`FEEDBACK_CODES` order). The
        row's feedback mode picks one, `latent_intervention="zero"` zeroes it."""
        state = self.state[row_slot]
        mode = state[:, FEEDBACK]
        latents = torch.where((mode == 0)[:, None], latents_by_mode[0],
                              torch.where((mode == 1)[:, None], latents_by_mode[1], latents_by_mode[2]))
        zero = (state[:, INTERVENTION] == INTERVENTION_CODES["zero"])[:, None]
        latents = torch.where(zero, torch.zeros_like(latents), latents)
        # Only the first computation for a position counts, as in GAP generate: a replayed row (after preemption,
        # its next token already folded) records nothing, and a pending vector already there for the same position
        # (computed before the preemption) is kept.
        write = (next_pos > state[:, FOLDED]) & (state[:, PENDING_POS] != next_pos)
        self._write(self.pending_vector, row_slot, torch.where(write[:, None], latents.to(self.pending_vector.dtype),
                                                               self.pending_vector[row_slot]))
        self._write(self.state[:, PENDING_POS], row_slot, torch.where(write, next_pos.long(), state[:, PENDING_POS]))

    def apply_span_rule(self, logits: torch.Tensor, row_slot: torch.Tensor) -> torch.Tensor:
        """(R, V) logits of the rows being sampled -> (R, V) with the span rule applied, in place where possible.

        `fixed`: K `<|latent_pad|>` after `<|latent_start|>`, then `<|latent_end|>`; `sampled_end`: end or slot,
        greedy by the end token's rank, sampled by its probability at the request's temperature; `drop` /
        `max_latent_spans` / a full history: no `<|latent_start|>`; a request that cannot be served (latent slots in
        its prompt, or its history lost): EOS."""
        tokens = self.tokens
        state = self.state[row_slot]
        slots_left, end_due = state[:, SLOTS_LEFT], state[:, END_DUE] > 0
        ended = (state[:, INVALID] > 0) | (state[:, EVICTED] > 0)
        in_span = (slots_left > 0) & ~ended
        sampled_end = in_span & (state[:, SAMPLED_END] > 0)
        greedy = state[:, GREEDY] > 0
        blocked = ~in_span & ~end_due & ~ended & ~self._can_open(state)
        minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)

        logits[:, tokens.start] = torch.where(blocked, minus_inf, logits[:, tokens.start])
        # sampled_end: greedy ends the span iff the end token ranks first; sampling chooses between end and a slot
        # with the end token's probability at the request's temperature.
        temperature = self.temperature[row_slot]
        scaled_end = logits[:, tokens.end].float() / temperature
        p_end = torch.exp(scaled_end - torch.logsumexp(logits.float() / temperature[:, None], dim=-1))
        p_end = p_end.clamp(1e-12, 1 - 1e-7)
        greedy_end = logits.argmax(dim=-1) == tokens.end
        two_way = sampled_end & ~greedy
        forced = torch.full_like(slots_left, -1)
        forced = torch.where(ended, torch.full_like(forced, tokens.eos), forced)
        forced = torch.where(in_span & ~sampled_end, torch.full_like(forced, tokens.pad), forced)
        forced = torch.where(sampled_end & greedy,
                             torch.where(greedy_end, torch.full_like(forced, tokens.end),
                                         torch.full_like(forced, tokens.pad)), forced)
        forced = torch.where(~in_span & end_due & ~ended, torch.full_like(forced, tokens.end), forced)
        is_forced = forced >= 0
        cleared = two_way | is_forced
        end_logit, pad_logit = logits[:, tokens.end].clone(), logits[:, tokens.pad].clone()
        logits.masked_fill_(cleared[:, None], float("-inf"))
        logits[:, tokens.end] = torch.where(two_way, (temperature * torch.log(p_end)).to(logits.dtype),
                                            torch.where(cleared, minus_inf, end_logit))
        logits[:, tokens.pad] = torch.where(two_way, (temperature * torch.log1p(-p_end)).to(logits.dtype),
                                            torch.where(cleared, minus_inf, pad_logit))
        index = forced.clamp(min=0)[:, None]
        logits.scatter_(1, index, torch.where(is_forced[:, None], torch.zeros_like(index, dtype=logits.dtype),
                                              logits.gather(1, index)))
        return logits


def compile_step(fn):
    """`torch.compile` as the per-step functions are compiled in vLLM's compiled mode: whole graph, dynamic shapes.
    Compile them inside `size_oblivious()` (the first calls, at warm-up): see there."""
    return torch.compile(fn, fullgraph=True, dynamic=True)


def size_oblivious():
    """Compile with backed sizes treated size-obliviously (as vLLM's own `backed_size_oblivious` mode does): without
    it every dynamic size of 1 is specialized, and a batch of one row (or token, or recorded row) would recompile
    each of the step's graphs for each combination, while requests wait. With it, the linear layer's one-row case
    remains the only specialization (two graphs for the record-and-feed step)."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(backed_size_oblivious=True)


def token_layout(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flattened batch's per-token `(row, position, valid)` from attention metadata, by tensor ops.

    query_start_loc: (R+1,) first token of each row; seq_lens: (R,) each row's sequence length after this step;
    num_tokens: N (>= query_start_loc[-1]; the tail is padding). Returns row (N,) in [0, R), position (N,) the
    token's index in its sequence, valid (N,)."""
    index = torch.arange(num_tokens, device=query_start_loc.device)
    num_rows = seq_lens.shape[0]
    ends = query_start_loc[1:num_rows + 1]
    row = torch.searchsorted(ends, index, right=True).clamp(max=max(num_rows - 1, 0))
    valid = index < query_start_loc[num_rows]
    position = seq_lens[row] - (ends[row] - index)
    return row, position, valid
