"""MG6 on the model: merge is idempotent, commutative and associative, and a delta merges like
the full state it came from."""

from __future__ import annotations

import contextlib

import hypothesis.strategies as st
from hypothesis import given

import presence_model.state as model

ME = model.ReplicaId("me", 1)
PEERS = (model.ReplicaId("p", 1), model.ReplicaId("q", 1))


def entry_for(dot: model.Dot) -> model.Entry:
    """Content is a function of the dot, as it is in a real history (dots are never reused)."""
    meta = f'{{"phx_ref":"{model.ref_of(dot)}"}}'
    return model.Entry(dot, f"t{dot.n % 2}", f"o{dot.n % 3}", "k", meta)


@st.composite
def payloads(draw: st.DrawFn) -> model.Payload:
    dots = draw(st.frozensets(st.builds(model.Dot, st.sampled_from(PEERS), st.integers(1, 6))))
    alive = draw(st.frozensets(st.sampled_from(sorted(dots)))) if dots else frozenset()
    return model.Payload(frozenset(entry_for(d) for d in alive), dots)


def knowing_everyone() -> model.Replica:
    state = model.new_replica(ME)
    for peer in PEERS:
        state, _ = model.replica_up(state, peer)
    return state


def stored(state: model.Replica) -> tuple[frozenset[model.Entry], frozenset[model.Dot]]:
    return state.entries, state.context


def merged(*payloads: model.Payload) -> model.Replica:
    state = knowing_everyone()
    for payload in payloads:
        state, _ = model.merge(state, payload)
    return state


@given(payloads())
def test_merge_is_idempotent(p: model.Payload) -> None:
    once = merged(p)
    again, diff = model.merge(once, p)
    assert stored(again) == stored(once)
    assert diff == model.Diff()


@given(payloads(), payloads())
def test_merge_is_commutative(p: model.Payload, q: model.Payload) -> None:
    assert stored(merged(p, q)) == stored(merged(q, p))


@given(payloads(), payloads(), payloads())
def test_merge_is_associative(p: model.Payload, q: model.Payload, r: model.Payload) -> None:
    # (p then q) then r, against p then (q joined with r, as one payload built by a replica).
    qr = merged(q, r)
    joined = model.Payload(qr.entries, qr.context)
    assert stored(merged(p, q, r)) == stored(merged(p, joined))


def apply_ops(sender: model.Replica, ops: list[tuple[str, int]], prefix: str) -> model.Replica:
    for op, i in ops:
        if op == "track":
            with contextlib.suppress(model.AlreadyTracked):
                sender, _ = model.track(sender, f"{prefix}{i}", "t", "k", {"i": i})
        elif op == "update":
            with contextlib.suppress(model.NotTracked):
                sender, _ = model.update(sender, f"{prefix}{i}", "t", "k", {"u": i})
        else:
            sender, _ = model.untrack_owner(sender, f"{prefix}{i}")
    return sender


operations = st.lists(st.tuples(st.sampled_from(["track", "update", "untrack"]), st.integers(0, 2)))


@given(operations, operations, st.sampled_from(["o", "x"]))
def test_delta_merges_like_its_full_state(
    first: list[tuple[str, int]], second: list[tuple[str, int]], prefix: str
) -> None:
    """A peer holding the sender's earlier state gets the same result from the next delta as
    from the sender's whole state."""
    sender = model.new_replica(PEERS[0])
    sender = apply_ops(sender, first, "o")
    sender, _ = model.take_delta(sender)  # that round reaches the peer as a full state instead
    receiver, _ = model.merge(knowing_everyone(), model.full_state(sender, ME))
    sender = apply_ops(sender, second, prefix)
    sender, delta = model.take_delta(sender)
    via_full, full_diff = model.merge(receiver, model.full_state(sender, ME))
    if delta is None:
        assert stored(via_full) == stored(receiver)
        return
    via_delta, delta_diff = model.merge(receiver, delta)
    assert stored(via_delta) == stored(via_full)
    assert delta_diff == full_diff
