"""Splitting a full state into chunks (``presence.core.chunks``): each chunk, any subset of them
and all of them together are safe to merge, and all of them give what the whole payload gives."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from presence.core.chunks import drop_entries, restrict, split_payload
from presence.core.state import State
from presence.core.types import Diff, Entry, Payload, ReplicaId

R = ReplicaId("r", 1)
"""The responder, whose full state is split."""
P = ReplicaId("p", 1)
Q = ReplicaId("q", 2)
D = ReplicaId("d", 1)
"""The requester, which merges the chunks."""
ORIGINS = {"r": R, "p": P, "q": Q}

# --- histories that give the responder and the requester different, overlapping states -----------

handles = st.tuples(st.sampled_from(["o1", "o2"]), st.sampled_from(["t1", "t2"]),
                    st.sampled_from(["k1", "k1", "k2"]))
# A local operation at one replica; then a peer's delta reaches the responder, is lost (a gap in
# the responder's context) or waits for the next one. Or the requester merges some replica's full
# state as it is now: the responder's (the requester then holds entries the responder changes
# later) or a peer's (the requester may know more of that peer than the responder).
operations = st.tuples(
    st.sampled_from(["track", "track", "track", "update", "update", "untrack", "untrack",
                     "snapshot"]),
    st.sampled_from(["r", "r", "p", "q"]), handles, st.integers(0, 9),
    st.sampled_from(["deliver", "deliver", "lose", "wait"]),
)
Operation = tuple[str, str, tuple[str, str, str], int, str]
SNAPSHOT: Operation = ("snapshot", "r", ("", "", ""), 0, "")
# A snapshot of the responder in the middle, so the requester holds much of what is then changed.
histories = st.builds(lambda before, after: [*before, SNAPSHOT, *after],
                      st.lists(operations, min_size=3, max_size=20),
                      st.lists(operations, min_size=3, max_size=20))


def _build(history: list[Operation]) -> tuple[State, State]:
    """Replay ``history``: the responder's state and the requester's (deterministic, so a history
    can be replayed to get identical copies)."""
    states = {name: State(replica) for name, replica in ORIGINS.items()}
    responder = states["r"]
    requester = State(D)
    for peer in (P, Q):
        responder.replica_up(peer)
    for replica in (R, P, Q):
        requester.replica_up(replica)
    for op, origin, handle, value, fate in history:
        state = states[origin]
        if op == "snapshot":
            requester.merge(state.full_state(D))
            continue
        owner, topic, key = handle
        tracked = any(p.owner == owner and p.key == key for p in state.list(topic)
                      if str(p.meta["phx_ref"]).startswith(f"{origin}."))
        if op == "track" and not tracked:
            state.track(owner, topic, key, {"v": value})
        elif op == "update" and tracked:
            state.update(owner, topic, key, {"v": value})
        elif op == "untrack":
            state.untrack(owner, topic, key)
        if origin != "r" and fate != "wait":
            delta = state.take_delta()
            if delta is not None and fate == "deliver":
                responder.merge(delta)
    return responder, requester


def _dots(payload: Payload) -> set[tuple[ReplicaId, int]]:
    return {(entry.replica, entry.counter) for entry in payload.entries}


def _counters(payload: Payload) -> set[tuple[ReplicaId, int]]:
    return {(replica, counter) for replica, ranges in payload.context.items()
            for first, last in ranges for counter in range(first, last + 1)}


def _snapshot(state: State) -> Any:
    """Everything stored, comparable: entries, context, statuses, the pending delta."""
    stored = state.full_state(None)
    entries = sorted((e.replica, e.counter, e.topic, e.owner, e.key,
                      json.dumps(dict(e.meta), sort_keys=True)) for e in stored.entries)
    delta = state.take_delta()
    return (entries, sorted(_counters(stored)), state.peers(), state.observe(),
            None if delta is None else (sorted(_dots(delta)), sorted(_counters(delta))))


def _refs(diffs: list[Diff]) -> tuple[list[str], list[str]]:
    joins = sorted(str(p.meta["phx_ref"]) for diff in diffs for p in diff.joins)
    leaves = sorted(str(p.meta["phx_ref"]) for diff in diffs for p in diff.leaves)
    return joins, leaves


def _in_any_order(payload: Payload, data: st.DataObject) -> Payload:
    """The payload with its entries in any order: a responder whose gaps were filled by
    transfers holds its entries in arrival order, not counter order."""
    entries = data.draw(st.permutations(payload.entries), label="entry order")
    return Payload(tuple(entries), payload.context)


@given(histories, st.integers(1, 4), st.data())
def test_every_chunk_is_one_replicas_range_and_together_they_are_the_payload(
        history: list[Operation], max_entries: int, data: st.DataObject) -> None:
    responder, _ = _build(history)
    payload = _in_any_order(responder.full_state(D), data)
    chunks = split_payload(payload, max_entries)
    for chunk in chunks:
        [replica] = chunk.context
        assert len(chunk.entries) <= max_entries
        assert all(entry.replica == replica for entry in chunk.entries)
        assert _dots(chunk) <= _counters(chunk), "an entry outside its chunk's context"
        # Every entry of the payload whose dot is in the chunk's context is in the chunk.
        assert _dots(payload) & _counters(chunk) == _dots(chunk)
    assert sorted(e for c in chunks for e in c.entries) == sorted(payload.entries)
    assert sum(len(_counters(c)) for c in chunks) == len(_counters(payload))
    assert set().union(*map(_counters, chunks)) == _counters(payload)


@given(histories, st.integers(1, 4), st.data())
def test_merging_every_chunk_gives_the_state_and_diff_of_merging_the_payload(
        history: list[Operation], max_entries: int, data: st.DataObject) -> None:
    responder, whole = _build(history)
    payload = _in_any_order(responder.full_state(D), data)
    whole_diff = whole.merge(payload)
    _, chunked = _build(history)
    chunk_diffs = [chunked.merge(chunk) for chunk in split_payload(payload, max_entries)]
    assert _snapshot(chunked) == _snapshot(whole)
    assert _refs(chunk_diffs) == _refs([whole_diff])


@given(histories, st.integers(1, 4), st.data())
def test_merging_any_subset_of_chunks_removes_only_what_the_responder_saw_removed(
        history: list[Operation], max_entries: int, data: st.DataObject) -> None:
    responder, requester = _build(history)
    payload = responder.full_state(D)
    chunks = split_payload(payload, max_entries)
    chosen = data.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    subset = [chunk for chunk, take in zip(chunks, chosen, strict=True) if take]
    before = _dots(requester.full_state(None))
    for chunk in subset:
        requester.merge(chunk)
    removed = before - _dots(requester.full_state(None))
    event(f"removed {'some' if removed else 'none'}; kept {'some' if before - removed else 'none'}")
    assert not removed & _dots(payload), "an entry the responder still holds was removed"
    assert removed <= _counters(payload), "an entry the responder never saw removed was removed"


# --- the helpers ---------------------------------------------------------------------------------


def test_a_replica_with_context_and_no_entries_is_one_chunk() -> None:
    payload = Payload((), {P: ((1, 5), (9, 9))})
    assert split_payload(payload, 1) == [payload]
    assert split_payload(Payload((), {P: ()}), 1) == []


def test_chunks_cover_consecutive_ranges_up_to_the_end_of_the_context() -> None:
    entries = tuple(Entry(P, n, "t", "o", f"k{n}", {}) for n in (2, 4, 7))
    payload = Payload(entries, {P: ((1, 4), (7, 10**12))})
    chunks = split_payload(payload, 2)
    assert chunks == [Payload(entries[:2], {P: ((1, 4),)}),
                      Payload(entries[2:], {P: ((7, 10**12),)})]


def test_malformed_input_is_refused() -> None:
    with pytest.raises(ValueError):
        split_payload(Payload(), 0)
    with pytest.raises(ValueError, match="missing from the context"):
        split_payload(Payload((Entry(P, 1, "t", "o", "k", {}),), {}), 1)


def test_restrict_and_drop_entries() -> None:
    assert restrict(((1, 3), (5, 9), (12, 12)), 2, 6) == ((2, 3), (5, 6))
    assert restrict(((1, 3), (5, 9)), 4, None) == ((5, 9),)
    big = Entry(P, 5, "t", "o", "k", {})
    small = Entry(P, 6, "t", "o", "k2", {})
    payload = Payload((big, small), {P: ((1, 8),), Q: ((1, 1),)})
    assert drop_entries(payload, [big]) == Payload((small,), {P: ((1, 4), (6, 8)), Q: ((1, 1),)})
    assert drop_entries(Payload((big,), {P: ((5, 5),)}), [big]) == Payload()
