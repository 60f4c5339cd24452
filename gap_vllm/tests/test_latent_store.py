"""The device-side core alone (`gap_vllm.latent_store`, torch only): graph safety and a fuzz of batch changes.

Graph safety, the CPU stand-ins for a GPU's defaults: the per-step code compiles with `fullgraph=True` (no graph
break), runs on fake tensors (any host read of a value fails), and a `make_fx` trace of a step replayed after the
store's buffers changed equals eager (what a captured CUDA graph does at replay).

The fuzz drives the store as vLLM's runners do (requests added, preempted, resumed and finished, chunked prefill,
padded batches, rows in shuffled order) and checks every fed vector and every sampled token against a plain Python
reference of GAP generate's span rule.
"""

import itertools
import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from gap_vllm.latent_store import (
    COUNT, FOLDED, PENDING_POS, SLOTS_LEFT, LatentStore, RequestOptions, SpanTokens, token_layout,
)

PAD, START, END, EOS = 10, 11, 12, 2
VOCAB, HIDDEN, K = 16, 8, 3
TOKENS = SpanTokens(pad=PAD, start=START, end=END, eos=EOS)


def options(**kw):
    base = dict(feedback="pca", intervention=None, max_spans=None, max_latents=K, sampled_end=False, temperature=0.0)
    return RequestOptions(**{**base, **kw})


def step(store, token_ids, embeds, query_start_loc, seq_lens, row_slot, hidden, logits):
    """One runner step: fold + feed before the forward, record + span rule after it."""
    fed = store.feed_step(token_ids, embeds, query_start_loc, seq_lens, row_slot)
    store.record(hidden, row_slot, seq_lens, torch.stack([hidden, 2 * hidden, 3 * hidden]))
    return fed, store.apply_span_rule(logits, row_slot)


def example_inputs(store):
    """Row 0 (slot 0): positions 3-5, row 1 (slot 1): positions 0-1, then a padding token."""
    ids = torch.tensor([1, START, PAD, 3, 4, 0])
    return (ids, torch.randn(6, HIDDEN), torch.tensor([0, 3, 5]), torch.tensor([6, 2]), torch.tensor([0, 1]),
            torch.randn(2, HIDDEN), torch.randn(2, VOCAB))


def fresh_store(**kw):
    store = LatentStore(4, 2 * K, HIDDEN, TOKENS, **kw)
    store.admit("a", options(), [1, 2, 3])
    store.admit("b", options(feedback="raw", sampled_end=True, temperature=0.7), [5])
    return store


def test_step_compiles_without_graph_breaks():
    torch._dynamo.reset()
    eager, compiled = fresh_store(), fresh_store()
    inputs = example_inputs(eager)
    expected = step(eager, *[t.clone() for t in inputs])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled, *[t.clone() for t in inputs])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    for name in ("vectors", "vector_pos", "pending_vector", "state", "temperature"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name))


def test_step_runs_on_fake_tensors():
    """Fake tensors have no values: `.item()`, `.tolist()`, `nonzero` or a branch on a value would raise here."""
    with FakeTensorMode():
        store = LatentStore(4, 2 * K, HIDDEN, TOKENS)
        inputs = example_inputs(store)
        fed, logits = step(store, *inputs)
        row, pos, valid = token_layout(torch.tensor([0, 3, 5]), torch.tensor([6, 2]), 6)
    assert fed.shape == (6, HIDDEN) and logits.shape == (2, VOCAB) and row.shape == pos.shape == valid.shape == (6,)


def test_traced_step_replays_after_the_buffers_change():
    """`make_fx` records the step as a graph over the store's buffers (what CUDA-graph capture freezes); replayed
    after the state moved on, it must equal eager on the same state: nothing of the values was baked in."""
    traced_store, eager_store = fresh_store(), fresh_store()
    inputs = example_inputs(traced_store)
    graph = make_fx(lambda *args: step(traced_store, *args))(*[t.clone() for t in inputs])
    # Move both stores on identically (a step eagerly), then replay the graph against new inputs.
    step(traced_store, *[t.clone() for t in inputs])
    step(eager_store, *[t.clone() for t in inputs])
    later = list(example_inputs(traced_store))
    later[0] = torch.tensor([PAD, 5, PAD, PAD, 7, 0])  # different tokens, a longer sequence
    later[3] = torch.tensor([9, 2])
    got = graph(*[t.clone() for t in later])
    expected = step(eager_store, *[t.clone() for t in later])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    for name in ("vectors", "vector_pos", "pending_vector", "state"):
        torch.testing.assert_close(getattr(traced_store, name), getattr(eager_store, name))


def test_token_layout():
    row, pos, valid = token_layout(torch.tensor([0, 3, 4, 6]), torch.tensor([10, 1, 7]), 8)
    assert row.tolist()[:6] == [0, 0, 0, 1, 2, 2] and valid.tolist() == [True] * 6 + [False] * 2
    assert pos.tolist()[:6] == [7, 8, 9, 0, 5, 6]


# ---- the fuzz ---------------------------------------------------------------------------------------------------
class Reference:
    """GAP generate's span rule for one request, in plain Python (the previous plugin's `RequestState`)."""

    def __init__(self, prompt, opts, capacity):
        self.opts, self.capacity = opts, capacity
        self.spans = sum(t == START for t in prompt)
        self.slots_left = opts.max_latents if prompt[-1] == START else 0
        self.end_due, self.count = False, 0

    def can_open(self):
        return (self.opts.intervention != "drop" and (self.opts.max_spans is None or self.spans < self.opts.max_spans)
                and self.count + self.opts.max_latents <= self.capacity)

    def forced(self):
        if self.slots_left > 0 and not self.opts.sampled_end:
            return PAD
        if self.slots_left == 0 and self.end_due:
            return END
        return None

    def advance(self, token):
        """Returns whether `token` is a latent slot."""
        if self.slots_left > 0:
            if token == PAD:
                self.slots_left -= 1
                self.end_due = self.slots_left == 0
                self.count += 1
                return True
            self.slots_left, self.end_due = 0, False
        elif self.end_due:
            self.end_due = False
        elif token == START and self.can_open():
            self.slots_left, self.spans = self.opts.max_latents, self.spans + 1
        return False


def hidden_of(request, position, token, replay):
    """The fake decoder: a final hidden state per (request, position, token); a replayed prefix gets different
    states, so a store that fed a recomputed latent instead of the history would be caught."""
    g = torch.Generator().manual_seed(hash((request, position, token, replay)) % (2**31))
    return torch.randn(HIDDEN, generator=g)


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_batch_changes_against_reference(seed):
    rng = random.Random(seed)
    capacity = 3 * K
    store = LatentStore(12, capacity, HIDDEN, TOKENS)  # room for every request: eviction is tested below
    embedding = torch.randn(VOCAB, HIDDEN)
    requests = {}
    for rid in range(10):
        prompt = [rng.choice([1, 3, 4, 5, START]) for _ in range(rng.randint(2, 9))]
        if rng.random() < 0.4:
            prompt[-1] = START
        mode = rng.choice(["pca", "ema_norm", "raw"])
        opts = options(feedback=mode, intervention=rng.choice([None, None, "zero", "drop"]),
                       max_spans=rng.choice([None, 1, 2]), sampled_end=rng.random() < 0.3)
        requests[rid] = dict(prompt=prompt, opts=opts, output=[], computed=0, live=False, replays=0,
                             ref=Reference(prompt, opts, capacity), fed={}, budget=rng.randint(8, 30))
    waiting = list(requests)
    checked_slots = 0
    for _ in range(400):
        # Batch changes: admit (new or resumed after preemption), preempt, finish.
        live = [r for r in requests if requests[r]["live"]]
        if waiting and len(live) < 4 and rng.random() < 0.7:
            rid = waiting.pop(rng.randrange(len(waiting)))
            req = requests[rid]
            req["live"], req["computed"] = True, 0  # (re)computed from its first token
            req["slot"] = store.admit(rid, req["opts"], req["prompt"], req["output"])
            live.append(rid)
        if live and rng.random() < 0.15:  # preempted: back to the queue, recomputed when resumed
            rid = rng.choice(live)
            requests[rid]["live"] = False
            requests[rid]["replays"] += 1
            store.release(rid)
            waiting.append(rid)
            live.remove(rid)
        if not live:
            if not waiting:
                break
            continue
        rng.shuffle(live)  # rows in any order (moves)
        # Schedule: each live request gets a chunk of its not-yet-computed tokens (chunked prefill) or one decode.
        ids, slots, positions, rows, chunks = [], [], [], [], []
        for rid in live:
            req = requests[rid]
            sequence = req["prompt"] + req["output"]
            n = min(len(sequence) - req["computed"], rng.randint(1, 5))
            chunk = range(req["computed"], req["computed"] + n)
            ids += [sequence[p] for p in chunk]
            slots += [req["slot"]] * n
            positions += list(chunk)
            req["computed"] += n
            rows.append((rid, req["computed"]))
            chunks.append(n)
        padding = rng.randint(0, 3)
        token_ids = torch.tensor(ids + [0] * padding)
        query_start_loc = torch.tensor([0] + list(itertools.accumulate(chunks)))
        seq_lens = torch.tensor([n for _, n in rows])
        row_slot = torch.tensor([requests[rid]["slot"] for rid, _ in rows])
        empty_rows = rng.randint(0, 2)  # padded rows (no tokens, the scratch slot), as a runner may add
        query_start_loc = torch.cat([query_start_loc, query_start_loc[-1:].repeat(empty_rows)])
        seq_lens = torch.cat([seq_lens, torch.zeros(empty_rows, dtype=torch.long)])
        row_slot = torch.cat([row_slot, torch.full((empty_rows,), store.scratch)])
        embeds = embedding[token_ids]
        fed = store.feed_step(token_ids, embeds.clone(), query_start_loc, seq_lens, row_slot)
        # Check every token's input against the reference.
        for i, (token, slot, position) in enumerate(zip(ids, slots, positions)):
            rid = next(r for r in live if requests[r]["slot"] == slot)
            expected = requests[rid]["fed"].get(position)
            if token == PAD and expected is not None:
                torch.testing.assert_close(fed[i], expected, msg=lambda m: f"{m} (request {rid}, position {position})")
                checked_slots += 1
            else:
                torch.testing.assert_close(fed[i], embedding[token], msg=lambda m: f"{m} (request {rid}, position {position})")
        # Record and sample on the rows whose chunk reached the end of their known tokens.
        hidden = torch.stack([hidden_of(rid, n - 1, (requests[rid]["prompt"] + requests[rid]["output"])[n - 1],
                                        requests[rid]["replays"]) for rid, n in rows])
        row_slot = torch.tensor([requests[rid]["slot"] for rid, _ in rows])
        next_pos = torch.tensor([n for _, n in rows])
        store.record(hidden, row_slot, next_pos, torch.stack([hidden, 2 * hidden, 3 * hidden]))
        logits = torch.randn(len(rows), VOCAB)
        logits[:, START] += rng.choice([0.0, 3.0])
        logits[:, PAD] += rng.choice([0.0, 2.5])  # now and then a pad sampled outside a span (a plain token)
        logits = store.apply_span_rule(logits, row_slot)
        sampled = logits.argmax(dim=-1).tolist()
        for (rid, n), token, h in zip(rows, sampled, hidden):
            req = requests[rid]
            if n < len(req["prompt"]) + len(req["output"]):
                continue  # a partial prefill: its sample is discarded
            forced = req["ref"].forced()
            if forced is not None:
                assert token == forced, (rid, req["output"], token, forced)
            if req["ref"].slots_left > 0:
                assert token in (PAD, END), (rid, req["output"], token)
            if token == START and not req["ref"].can_open() and req["ref"].slots_left == 0 and not req["ref"].end_due:
                pytest.fail(f"request {rid} opened a span it may not open")
            is_slot = req["ref"].advance(token)
            if is_slot:
                scale = {"pca": 1, "ema_norm": 2, "raw": 3}[req["opts"].feedback]
                req["fed"][n] = torch.zeros(HIDDEN) if req["opts"].intervention == "zero" else scale * h
            req["output"].append(token)
            if len(req["output"]) >= req["budget"]:
                req["live"] = False
                store.release(rid)  # finished
    assert checked_slots > 5, "the fuzz fed too few latent slots to mean anything"
    assert any(r["replays"] for r in requests.values()), "no request was preempted"


def test_span_rule_blocks_and_forces():
    store = LatentStore(4, 2 * K, HIDDEN, TOKENS)
    drop = store.admit("drop", options(intervention="drop"), [1, 2])
    capped = store.admit("capped", options(max_spans=0), [1, 2])
    opened = store.admit("open", options(), [1, START])
    bad = store.admit("bad", options(), [1, PAD, 3])
    ids = torch.tensor([1, 2, 1, 2, 1, START, 1, PAD, 3])  # the prompts, prefilled
    store.feed_step(ids, torch.zeros(9, HIDDEN), torch.tensor([0, 2, 4, 6, 9]), torch.tensor([2, 2, 2, 3]),
                    torch.tensor([drop, capped, opened, bad]))
    logits = store.apply_span_rule(torch.zeros(4, VOCAB), torch.tensor([drop, capped, opened, bad]))
    assert logits[0, START] == float("-inf") and logits[1, START] == float("-inf")
    assert logits[2].argmax() == PAD and torch.isinf(logits[2]).sum() == VOCAB - 1
    assert logits[3].argmax() == EOS
    assert store.state[opened, SLOTS_LEFT] == K and store.state[opened, FOLDED] == 1


def test_evicted_history_ends_the_request():
    """A request whose parked slot was reused cannot be fed its latents again: it is ended, not fed plain slot
    embeddings."""
    store = LatentStore(1, 2 * K, HIDDEN, TOKENS)
    store.admit("old", options(), [1, START])
    store.release("old")
    store.admit("new", options(), [3])  # takes the only slot: "old" is evicted
    store.release("new")
    slot = store.admit("old", options(), [1, START], [PAD, PAD])
    logits = store.apply_span_rule(torch.zeros(1, VOCAB), torch.tensor([slot]))
    assert logits[0].argmax() == EOS and store.state[slot, COUNT] == 0 and store.state[slot, PENDING_POS] == -1
