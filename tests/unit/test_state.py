"""Unit tests of ``presence.core.state.State``: one or more focused tests per rule of spec
sections 1-6, plus property tests of the merge laws (MG6)."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from presence.core.state import State
from presence.core.types import (
    AlreadyTracked,
    Diff,
    Entry,
    NotTracked,
    Payload,
    Presence,
    ReplicaId,
    Status,
)

A = ReplicaId("a", 1)
B = ReplicaId("b", 1)
C = ReplicaId("c", 1)


def connected(replica: ReplicaId, *peers: ReplicaId) -> State:
    state = State(replica)
    for peer in peers:
        state.replica_up(peer)
    return state


def refs(presences: tuple[Presence, ...] | list[Presence]) -> list[str]:
    return [p.meta["phx_ref"] for p in presences]


def snapshot(state: State) -> tuple[frozenset[tuple[Any, ...]], dict[ReplicaId, Any]]:
    """The stored state (entries and context) in a canonical, comparable form."""
    payload = state.full_state(None)
    entries = frozenset(
        (e.replica, e.counter, e.topic, e.owner, e.key, tuple(sorted(e.meta.items())))
        for e in payload.entries
    )
    return entries, dict(payload.context)


def entry(
    replica: ReplicaId,
    counter: int,
    topic: str = "t",
    owner: str = "o",
    key: str = "k",
    **meta: Any,
) -> Entry:
    ref = f"{replica.name}.{replica.vsn}.{counter}"
    return Entry(replica, counter, topic, owner, key, {**meta, "phx_ref": ref})


# --- ST: the state ------------------------------------------------------------------------------


def test_st2_fresh_state_is_empty() -> None:
    state = State(A)
    assert state.replica == A
    assert state.clock() == {A: 0}
    assert state.size() == 0
    assert state.peers() == {}
    assert state.observe() == []
    assert state.take_delta() is None
    assert not state.has_context_dot(A, 1)


def test_st3_clock_covers_self_and_up_peers_only() -> None:
    state = connected(A, B, C)
    state.track("o", "t", "k", {})
    assert state.clock() == {A: 1, B: 0, C: 0}
    state.replica_down(C)
    assert state.clock() == {A: 1, B: 0}


def test_st3_clock_is_the_contiguous_prefix() -> None:
    state = connected(A, B)
    state.merge(Payload((), {B: ((1, 2), (4, 4))}))
    assert state.clock()[B] == 2
    assert state.has_context_dot(B, 4) and not state.has_context_dot(B, 3)


def test_st4_list_shows_own_and_up_peers_entries_only() -> None:
    state = connected(A, B, C)
    state.track("o", "t", "k", {})
    state.merge(Payload((entry(B, 1), entry(C, 1)), {}))
    assert sorted(refs(state.list("t"))) == ["a.1.1", "b.1.1", "c.1.1"]
    state.replica_down(C)
    assert sorted(refs(state.list("t"))) == ["a.1.1", "b.1.1"]
    assert state.size() == 3
    assert state.list("elsewhere") == []


def test_st4_topics_lists_only_topics_with_a_visible_presence() -> None:
    state = connected(A, B)
    state.track("o", "mine", "k", {})
    state.merge(Payload((entry(B, 1, topic="theirs"), entry(B, 2, topic="mine")), {}))
    assert state.topics() == ["mine", "theirs"]
    state.replica_down(B)
    assert state.topics() == ["mine"]
    state.untrack("o", "mine", "k")
    assert state.topics() == []
    state.replica_up(B)
    assert state.topics() == ["mine", "theirs"]


def test_st4_get_by_key_filters_one_key() -> None:
    state = connected(A, B)
    state.track("o1", "t", "alice", {})
    state.track("o2", "t", "bob", {})
    state.merge(Payload((entry(B, 1, owner="o1", key="alice"),), {}))
    assert refs(state.get_by_key("t", "alice")) == ["a.1.1", "b.1.1"]
    assert state.get_by_key("t", "carol") == []


def test_st5_unknown_replicas_are_ignored_on_arrival() -> None:
    state = connected(A, B)
    diff = state.merge(Payload((entry(C, 1),), {C: ((1, 5),)}))
    assert not diff
    assert state.size() == 0
    assert not state.has_context_dot(C, 1)
    assert C not in state.clock()


# --- ID: identity, refs and observation order ---------------------------------------------------


def test_id4_track_sets_ref_and_overwrites_caller_refs() -> None:
    state = State(A)
    meta = {"phx_ref": "forged", "phx_ref_prev": "forged", "x": 1}
    diff = state.track("o", "t", "k", meta)
    assert diff.joins[0].meta == {"phx_ref": "a.1.1", "x": 1}
    assert meta["phx_ref"] == "forged"  # the caller's dict is not touched


def test_id4_update_sets_ref_and_previous_ref() -> None:
    state = State(A)
    state.track("o", "t", "k", {})
    diff = state.update("o", "t", "k", {"phx_ref": "forged", "phx_ref_prev": "forged"})
    assert diff.joins[0].meta == {"phx_ref": "a.1.3", "phx_ref_prev": "a.1.1"}


def test_id5_observe_sorts_by_topic_key_owner_ref_in_code_point_order() -> None:
    state = connected(A, B)
    state.track("o", "t", "k", {})
    state.track("o", "t", "K", {})
    state.track("o", "T", "k", {})
    state.track("O", "t", "k", {})
    state.merge(Payload((entry(B, 9), entry(B, 10)), {}))
    observed = [(p.topic, p.key, p.owner, p.meta["phx_ref"]) for p in state.observe()]
    assert observed == [
        ("T", "k", "o", "a.1.3"),
        ("t", "K", "o", "a.1.2"),
        ("t", "k", "O", "a.1.4"),
        ("t", "k", "o", "a.1.1"),
        ("t", "k", "o", "b.1.10"),
        ("t", "k", "o", "b.1.9"),
    ]


def test_id5_list_breaks_ties_on_ref_as_a_string() -> None:
    state = connected(A, B)
    same = {"topic": "t", "owner": "o", "key": "k"}
    state.merge(Payload((entry(B, 9, **same), entry(B, 10, **same)), {}))
    assert refs(state.list("t")) == ["b.1.10", "b.1.9"]


# --- OP: local operations -----------------------------------------------------------------------


def test_op1_track_joins_and_consumes_one_dot() -> None:
    state = State(A)
    diff = state.track("o", "t", "k", {"x": 1})
    assert diff == Diff(joins=(Presence("t", "k", "o", {"x": 1, "phx_ref": "a.1.1"}),))
    assert state.clock() == {A: 1}
    assert state.list("t") == list(diff.joins)


def test_op1_tracking_a_tracked_handle_fails_and_changes_nothing() -> None:
    state = State(A)
    state.track("o", "t", "k", {})
    with pytest.raises(AlreadyTracked) as raised:
        state.track("o", "t", "k", {"other": True})
    assert (raised.value.topic, raised.value.owner, raised.value.key) == ("t", "o", "k")
    assert state.clock() == {A: 1}
    assert refs(state.observe()) == ["a.1.1"]


def test_op1_owners_share_a_key_and_one_owner_holds_many_handles() -> None:
    state = State(A)
    state.track("o1", "t", "k", {})
    state.track("o2", "t", "k", {})
    state.track("o1", "t", "k2", {})
    state.track("o1", "u", "k", {})
    assert len(state.get_by_key("t", "k")) == 2
    assert state.size() == 4


def test_op2_untrack_leaves_with_stored_meta_and_consumes_one_dot() -> None:
    state = State(A)
    state.track("o", "t", "k", {"x": 1})
    diff = state.untrack("o", "t", "k")
    assert diff == Diff(leaves=(Presence("t", "k", "o", {"x": 1, "phx_ref": "a.1.1"}),))
    assert state.clock() == {A: 2}
    assert state.observe() == []
    state.track("o", "t", "k", {})  # the handle is free again
    assert refs(state.observe()) == ["a.1.3"]


def test_op2_untracking_what_is_not_tracked_does_nothing() -> None:
    state = State(A)
    state.track("o", "t", "k", {})
    state.take_delta()
    assert state.untrack("o", "t", "other") == Diff()
    assert state.untrack("nobody", "t", "k") == Diff()
    assert state.clock() == {A: 1}
    assert state.take_delta() is None


def test_op3_update_replaces_meta_exactly_in_one_diff_with_two_dots() -> None:
    state = State(A)
    state.track("o", "t", "k", {"old": 1})
    diff = state.update("o", "t", "k", {"new": 2})
    assert diff.joins == (
        Presence("t", "k", "o", {"new": 2, "phx_ref": "a.1.3", "phx_ref_prev": "a.1.1"}),
    )
    assert diff.leaves == (Presence("t", "k", "o", {"old": 1, "phx_ref": "a.1.1"}),)
    assert state.clock() == {A: 3}  # a.1.2 is the removal dot, carried by no entry
    assert state.observe() == list(diff.joins)


def test_op3_updating_what_is_not_tracked_fails_and_changes_nothing() -> None:
    state = State(A)
    state.track("o", "t", "k", {})
    state.take_delta()
    with pytest.raises(NotTracked):
        state.update("o", "t", "other", {})
    with pytest.raises(NotTracked):
        state.update("nobody", "t", "k", {})
    assert state.clock() == {A: 1}
    assert state.take_delta() is None


def test_op3_updated_entry_still_belongs_to_its_owner() -> None:
    state = State(A)
    state.track("o", "t", "k", {})
    state.track("o", "t", "k2", {})
    state.update("o", "t", "k", {"v": 2})
    diff = state.untrack_owner("o")
    assert sorted(refs(diff.leaves)) == ["a.1.2", "a.1.4"]
    assert state.size() == 0


def test_op4_untrack_owner_removes_only_that_owner_under_one_dot() -> None:
    state = State(A)
    state.track("o1", "t", "k", {})
    state.track("o1", "u", "k", {})
    state.track("o2", "t", "k", {})
    diff = state.untrack_owner("o1")
    assert sorted(refs(diff.leaves)) == ["a.1.1", "a.1.2"]
    assert not diff.joins
    assert state.clock() == {A: 4}
    assert refs(state.observe()) == ["a.1.3"]
    state.track("o1", "t", "k", {})  # handles of the ended owner are free again
    assert state.size() == 2


def test_op4_untrack_owner_with_nothing_consumes_no_dot() -> None:
    state = State(A)
    assert state.untrack_owner("o") == Diff()
    assert state.clock() == {A: 0}
    assert state.take_delta() is None


# --- DL: deltas and full states -----------------------------------------------------------------


def test_dl1_delta_holds_new_live_entries_and_every_touched_dot() -> None:
    state = State(A)
    state.track("o", "t", "k1", {})  # 1
    state.track("o", "t", "k2", {})  # 2
    assert state.take_delta() is not None
    state.track("o", "t", "k3", {})  # 3
    state.untrack("o", "t", "k1")  # removes 1, consumes 4
    state.track("o", "t", "k4", {})  # 5
    state.untrack("o", "t", "k4")  # removes 5, consumes 6
    state.update("o", "t", "k3", {})  # removes 3, consumes the removal dot 7, creates 8
    delta = state.take_delta()
    assert delta is not None
    assert [(e.counter, e.key) for e in delta.entries] == [(8, "k3")]
    assert delta.context == {A: ((1, 1), (3, 8))}
    assert state.take_delta() is None


def test_dl1_delta_of_removals_adjacent_to_the_window_is_one_range() -> None:
    state = State(A)
    state.track("o", "t", "k1", {})
    state.track("o", "t", "k2", {})
    state.take_delta()
    state.untrack("o", "t", "k2")
    delta = state.take_delta()
    assert delta == Payload((), {A: ((2, 3),)})


def test_dl2_merge_relays_removals_but_not_additions() -> None:
    source = connected(B, A)
    source.track("o", "t", "k", {})
    relay = connected(A, B)
    relay.merge(source.full_state(A))
    assert relay.take_delta() is None  # additions are not relayed
    source.untrack("o", "t", "k")
    relay.merge(source.full_state(A))
    assert relay.take_delta() == Payload((), {B: ((1, 1),)})


def test_dl3_full_state_leaves_out_the_requesters_entries_and_dots() -> None:
    state = connected(A, B, C)
    state.track("o", "t", "k", {})
    state.merge(Payload((entry(B, 1), entry(C, 2)), {C: ((1, 2),)}))
    payload = state.full_state(B)
    assert sorted((e.replica, e.counter) for e in payload.entries) == [(A, 1), (C, 2)]
    assert payload.context == {A: ((1, 1),), C: ((1, 2),)}
    assert len(state.full_state(None).entries) == 3


def test_dl3_full_state_includes_down_peers_and_out_of_order_dots() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1), entry(B, 5)), {B: ((1, 1), (4, 5))}))
    state.replica_down(B)
    payload = state.full_state(C)
    assert len(payload.entries) == 2
    assert payload.context == {B: ((1, 1), (4, 5))}


# --- MG: merge ----------------------------------------------------------------------------------


def test_mg1_own_dots_in_a_payload_never_change_own_entries() -> None:
    state = connected(A, B)
    state.track("o", "t", "k", {})
    forged = Payload((entry(A, 2, key="forged"),), {A: ((1, 5),)})
    assert state.merge(forged) == Diff()
    assert refs(state.observe()) == ["a.1.1"]
    assert state.clock()[A] == 1


def test_mg2_unseen_entry_is_added_and_joined() -> None:
    state = connected(A, B)
    diff = state.merge(Payload((entry(B, 1, x=1),), {B: ((1, 1),)}))
    assert diff == Diff(joins=(Presence("t", "k", "o", {"x": 1, "phx_ref": "b.1.1"}),))
    assert state.clock()[B] == 1


def test_mg2_add_wins_over_an_unobserved_removal() -> None:
    """C got B's entry from A before hearing of its removal: it is added; the removal, once
    observed, removes it."""
    origin = connected(B, A, C)
    origin.track("o", "t", "k", {})
    via = connected(A, B, C)
    via.merge(origin.full_state(A))
    origin.untrack("o", "t", "k")
    removal = origin.take_delta()
    receiver = connected(C, A, B)
    assert refs(receiver.merge(via.full_state(C)).joins) == ["b.1.1"]
    assert removal is not None
    assert refs(receiver.merge(removal).leaves) == ["b.1.1"]
    assert receiver.observe() == []


def test_mg3_observed_removal_is_not_undone_by_a_stale_copy() -> None:
    origin = connected(B, A, C)
    origin.track("o", "t", "k", {})
    stale = origin.full_state(C)
    origin.untrack("o", "t", "k")
    receiver = connected(C, A, B)
    receiver.merge(origin.full_state(C))
    assert receiver.merge(stale) == Diff()
    assert receiver.observe() == []


def test_mg3_removes_only_entries_the_payload_has_seen_and_lacks() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1, key="k1"), entry(B, 2, key="k2"), entry(B, 3, key="k3")), {}))
    diff = state.merge(Payload((entry(B, 2, key="k2"),), {B: ((1, 2),)}))
    assert refs(diff.leaves) == ["b.1.1"] and not diff.joins
    assert sorted(refs(state.observe())) == ["b.1.2", "b.1.3"]


def test_mg3_large_context_range_against_few_stored_entries() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 3), entry(B, 900, key="kept")), {}))
    diff = state.merge(Payload((), {B: ((1, 10), (1_000, 20_000))}))
    assert refs(diff.leaves) == ["b.1.3"]
    assert refs(state.observe()) == ["b.1.900"]


def test_mg4_payload_entry_dots_count_as_context_even_if_left_out() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1), entry(B, 2, key="k2")), {}))
    assert state.clock()[B] == 2


def test_mg4_context_of_known_peers_is_absorbed() -> None:
    state = connected(A, B)
    state.merge(Payload((), {B: ((1, 3),), C: ((1, 3),)}))
    assert state.clock() == {A: 0, B: 3}
    assert not state.has_context_dot(C, 1)


def test_mg4_out_of_order_dots_keep_the_clock_behind_until_the_gap_is_filled() -> None:
    """T29, T30: a missed delta leaves a gap; the clock stays behind; filling it compacts."""
    origin = connected(B, A)
    origin.track("o", "t", "k1", {})  # 1
    origin.track("o", "t", "k2", {})  # 2
    first = origin.take_delta()
    origin.untrack("o", "t", "k2")  # removes 2, consumes 3
    origin.track("o", "t", "k3", {})  # 4
    second = origin.take_delta()
    assert first is not None and second is not None
    receiver = connected(A, B)
    receiver.merge(second)
    assert receiver.clock()[B] == 0
    assert not receiver.has_context_dot(B, 1) and receiver.has_context_dot(B, 2)
    assert refs(receiver.observe()) == ["b.1.4"]
    receiver.merge(first)  # k2 was seen removed: it is not added back
    assert receiver.clock()[B] == 4
    assert refs(receiver.observe()) == ["b.1.1", "b.1.4"]
    assert receiver.full_state(None).context == {B: ((1, 4),)}


def test_mg4_a_full_state_fills_the_gap() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 5),), {B: ((5, 6),)}))
    assert state.clock()[B] == 0
    state.merge(Payload((entry(B, 5),), {B: ((1, 7),)}))
    assert state.clock()[B] == 7
    assert state.full_state(None).context == {B: ((1, 7),)}


def test_mg5_down_peers_entries_are_stored_and_removed_silently() -> None:
    state = connected(A, B)
    state.replica_down(B)
    assert state.merge(Payload((entry(B, 1), entry(B, 2, key="k2")), {})) == Diff()
    assert state.size() == 2 and state.observe() == []
    assert state.merge(Payload((entry(B, 2, key="k2"),), {B: ((1, 2),)})) == Diff()
    assert state.size() == 1
    assert refs(state.replica_up(B).joins) == ["b.1.2"]


def test_mg5_a_remote_update_is_one_join_and_one_leave() -> None:
    origin = connected(B, A)
    origin.track("o", "t", "k", {"v": 1})
    receiver = connected(A, B)
    receiver.merge(origin.full_state(A))
    origin.update("o", "t", "k", {"v": 2})
    delta = origin.take_delta()
    assert delta is not None
    diff = receiver.merge(delta)
    assert refs(diff.joins) == ["b.1.3"] and refs(diff.leaves) == ["b.1.1"]


def test_mg6_merging_twice_changes_nothing() -> None:
    origin = connected(B, A)
    origin.track("o", "t", "k", {})
    payload = origin.full_state(A)
    receiver = connected(A, B)
    receiver.merge(payload)
    before = snapshot(receiver)
    assert receiver.merge(payload) == Diff()
    assert snapshot(receiver) == before


def test_mg_duplicate_entries_in_one_payload_join_once() -> None:
    state = connected(A, B)
    diff = state.merge(Payload((entry(B, 1), entry(B, 1)), {}))
    assert len(diff.joins) == 1 and state.size() == 1


# --- RL: replica lifecycle ----------------------------------------------------------------------


def test_rl1_unknown_replica_comes_up_with_nothing_stored() -> None:
    state = State(A)
    assert state.replica_up(B) == Diff()
    assert state.status(B) is Status.UP
    assert state.clock() == {A: 0, B: 0}
    assert state.replica_up(B) == Diff()  # already up: nothing


def test_rl1_down_replica_comes_back_with_its_entries() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1),), {}))
    state.replica_down(B)
    diff = state.replica_up(B)
    assert refs(diff.joins) == ["b.1.1"] and not diff.leaves
    assert refs(state.observe()) == ["b.1.1"]


def test_rl1_the_local_replica_is_never_its_own_peer() -> None:
    state = State(A)
    assert state.replica_up(A) == Diff()
    assert state.peers() == {}


def test_rl2_down_hides_and_leaves_entries_once() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1),), {}))
    diff = state.replica_down(B)
    assert refs(diff.leaves) == ["b.1.1"] and not diff.joins
    assert state.status(B) is Status.DOWN
    assert state.size() == 1 and state.observe() == []
    assert state.replica_down(B) == Diff()
    assert state.replica_down(C) == Diff()


def test_rl3_permdown_of_an_up_replica_leaves_and_forgets_everything() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1), entry(B, 2, key="k2")), {B: ((1, 4), (6, 6))}))
    state.merge(Payload((entry(B, 2, key="k2"),), {B: ((1, 2),)}))  # relays the removal of 1
    diff = state.replica_permdown(B)
    assert refs(diff.leaves) == ["b.1.2"]
    assert state.status(B) is None and state.peers() == {}
    assert state.size() == 0 and state.list("t") == []
    assert not state.has_context_dot(B, 1)
    assert state.take_delta() is None  # the relayed dot is forgotten too
    assert state.latest_vsn("b") == 1


def test_rl3_permdown_of_a_down_replica_does_not_leave_again() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1),), {}))
    state.replica_down(B)
    assert state.replica_permdown(B) == Diff()
    assert state.size() == 0
    assert state.replica_permdown(B) == Diff()


def test_rl3_fd3_a_forgotten_replica_comes_back_new() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1),), {B: ((1, 1),)}))
    state.replica_permdown(B)
    state.replica_up(B)
    assert state.clock()[B] == 0 and state.size() == 0
    assert refs(state.merge(Payload((entry(B, 1),), {})).joins) == ["b.1.1"]


def test_rl4_own_name_and_older_incarnations_are_ignored() -> None:
    state = State(A)
    assert state.observe_incarnation(ReplicaId("a", 2)) == (False, Diff())
    assert state.observe_incarnation(ReplicaId("b", 3))[0]
    assert state.observe_incarnation(ReplicaId("b", 2)) == (False, Diff())
    assert state.observe_incarnation(ReplicaId("b", 3))[0]
    assert state.latest_vsn("b") == 3
    assert state.latest_vsn("zz") is None


def test_rl4_newer_incarnation_permdowns_the_older_first_without_registering() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1),), {}))
    newer = ReplicaId("b", 2)
    accepted, diff = state.observe_incarnation(newer)
    assert accepted and refs(diff.leaves) == ["b.1.1"]
    assert state.peers() == {}
    assert state.latest_vsn("b") == 2
    state.replica_up(newer)
    assert state.peers() == {newer: Status.UP}


def test_rl4_newer_incarnation_of_a_down_replica_leaves_nothing() -> None:
    state = connected(A, B)
    state.merge(Payload((entry(B, 1),), {}))
    state.replica_down(B)
    assert state.observe_incarnation(ReplicaId("b", 2)) == (True, Diff())
    assert state.size() == 0


def test_rl4_up_records_the_vsn() -> None:
    state = connected(A, ReplicaId("b", 4))
    assert state.observe_incarnation(ReplicaId("b", 3)) == (False, Diff())


# --- MG6: merge laws, as properties -------------------------------------------------------------

OWNERS = st.sampled_from(["o1", "o2"])
TOPICS = st.sampled_from(["t1", "t2"])
KEYS = st.sampled_from(["k1", "k2"])
KINDS = st.sampled_from(["track", "untrack", "update", "untrack_owner", "delta", "full", "sync"])
Op = tuple[str, bool, str, str, str]
"""(kind, on A rather than B, owner, topic, key)"""
OPS: st.SearchStrategy[Op] = st.tuples(KINDS, st.booleans(), OWNERS, TOPICS, KEYS)


def apply_local(state: State, kind: str, owner: str, topic: str, key: str, step: int) -> None:
    """One local operation; the caller's misuse errors are part of the game, not failures."""
    try:
        if kind == "track":
            state.track(owner, topic, key, {"step": step})
        elif kind == "untrack":
            state.untrack(owner, topic, key)
        elif kind == "update":
            state.update(owner, topic, key, {"step": step})
        elif kind == "untrack_owner":
            state.untrack_owner(owner)
    except (AlreadyTracked, NotTracked):
        return


def payloads_of(ops: list[Op]) -> list[Payload]:
    """Run operations on two replicas A and B that know each other; collect the deltas and full
    states they produce (with B's entries and relayed removals showing up in A's, and back)."""
    replicas = {True: connected(A, B), False: connected(B, A)}
    produced: list[Payload] = []
    for step, (kind, which, owner, topic, key) in enumerate(ops):
        state, other = replicas[which], replicas[not which]
        if kind == "delta":
            delta = state.take_delta()
            if delta is not None:
                produced.append(delta)
                other.merge(delta)
        elif kind == "full":
            produced.append(state.full_state(None))
        elif kind == "sync":
            other.merge(state.full_state(other.replica))
        else:
            apply_local(state, kind, owner, topic, key, step)
    produced.extend(replicas[which].full_state(None) for which in (True, False))
    return produced


def receiver() -> State:
    return connected(C, A, B)


payload_lists = st.lists(OPS, max_size=25).map(payloads_of)


@settings(max_examples=60, deadline=None)
@given(payload_lists, st.data())
def test_mg6_merge_is_idempotent(payloads: list[Payload], data: st.DataObject) -> None:
    payload = data.draw(st.sampled_from(payloads))
    state = receiver()
    state.merge(payload)
    once = snapshot(state)
    assert state.merge(payload) == Diff()
    assert snapshot(state) == once


@settings(max_examples=60, deadline=None)
@given(payload_lists, st.data())
def test_mg6_merge_is_commutative(payloads: list[Payload], data: st.DataObject) -> None:
    first, second = data.draw(st.sampled_from(payloads)), data.draw(st.sampled_from(payloads))
    one, two = receiver(), receiver()
    one.merge(first)
    one.merge(second)
    two.merge(second)
    two.merge(first)
    assert snapshot(one) == snapshot(two)
    assert one.observe() == two.observe()


@settings(max_examples=60, deadline=None)
@given(payload_lists, st.data())
def test_mg6_merge_is_associative(payloads: list[Payload], data: st.DataObject) -> None:
    x, y, z = (data.draw(st.sampled_from(payloads)) for _ in range(3))
    left = receiver()
    for payload in (x, y, z):
        left.merge(payload)
    joined = receiver()
    joined.merge(y)
    joined.merge(z)
    right = receiver()
    right.merge(x)
    right.merge(joined.full_state(None))
    assert snapshot(left) == snapshot(right)


@settings(max_examples=60, deadline=None)
@given(st.lists(OPS, max_size=25))
def test_mg6_a_delta_merges_like_the_full_state_that_contains_it(ops: list[Op]) -> None:
    """A receiver in sync with B up to the last take gets the same state from B's next delta as
    from B's full state."""
    origin = connected(B, A)
    synced = receiver()
    origin.take_delta()
    synced.merge(origin.full_state(C))
    for step, (kind, _, owner, topic, key) in enumerate(ops):
        apply_local(origin, kind, owner, topic, key, step)
    delta = origin.take_delta()
    by_full = receiver()
    by_full.merge(snapshot_payload(synced))
    by_delta = receiver()
    by_delta.merge(snapshot_payload(synced))
    full_diff = by_full.merge(origin.full_state(C))
    delta_diff = by_delta.merge(delta) if delta is not None else Diff()
    assert snapshot(by_full) == snapshot(by_delta)
    assert sorted(refs(full_diff.joins)) == sorted(refs(delta_diff.joins))
    assert sorted(refs(full_diff.leaves)) == sorted(refs(delta_diff.leaves))


def snapshot_payload(state: State) -> Payload:
    return state.full_state(None)


def test_st1_out_of_order_ranges_are_kept_as_ranges_and_compact_when_the_gap_fills() -> None:
    state = connected(A, B)
    state.merge(Payload((), {B: ((5, 1_000_000_000),)}))  # far above a gap: one range, not 10^9
    assert state.clock()[B] == 0
    assert state.has_context_dot(B, 5) and state.has_context_dot(B, 1_000_000_000)
    assert not state.has_context_dot(B, 4) and not state.has_context_dot(B, 1_000_000_001)
    state.merge(Payload((entry(B, 2),), {B: ((1, 3),)}))
    assert state.clock()[B] == 3  # still a gap at 4
    assert state.full_state(None).context[B] == ((1, 3), (5, 1_000_000_000))
    state.merge(Payload((), {B: ((4, 4),)}))
    assert state.clock()[B] == 1_000_000_000
    assert state.full_state(None).context[B] == ((1, 1_000_000_000),)
