"""The bounded exhaustive explorer and the invariants it checks.

(i) Every history of the CI-sized bounds (2 nodes and 6 events, 3 nodes and 4 events, with
network non-determinism, partitions, stops and restarts) keeps every invariant; the figures are
printed and the state counts must clear a floor, so an enumerator that explores nothing fails.
(ii) Deliberately broken variants of the model are swapped in, and the explorer must find each
one, with a shortest history that replays as a regression file.
(iii) Each invariant reports a violation on a small hand-made cluster.

Deeper runs: ``python -m presence_model.explore --deep``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import pytest

import presence_model.cluster as c
import presence_model.explore as ex
import presence_model.history as mh
import presence_model.invariants as inv
import presence_model.protocol as p
import presence_model.state as s

CONFIG = ex.DEFAULT_CONFIG
Step = dict[str, Any]


# --- (i) the CI-sized explorations --------------------------------------------------------------


FLOORS = {2: 10_000, 3: 5_000}
"""At about half the states the CI targets reach today (24 078 and 10 677)."""


@pytest.mark.parametrize(
    ("nodes", "events"),
    [(list(names), events) for names, events in ex.CI_TARGETS],
    ids=[f"{len(names)}-nodes-{events}-events" for names, events in ex.CI_TARGETS],
)
def test_every_history_keeps_every_invariant(nodes: list[str], events: int) -> None:
    floor = FLOORS[len(nodes)]
    report = ex.explore(nodes, events, clock=time.perf_counter)
    print("\n".join(report.lines()))
    assert report.violation is None, "\n".join(report.lines())
    assert report.complete
    assert report.max_depth == events
    assert len(report.states_per_depth) == events + 1
    assert report.states == sum(report.states_per_depth) >= floor
    assert report.transitions > report.states
    assert report.histories > report.transitions
    assert 0 < report.settle_rounds_needed <= report.settle_rounds


def test_counts_of_one_event() -> None:
    """From a fresh cluster, one event is one transition and one history per event."""
    root = c.new_cluster(["a", "b"], CONFIG)
    first = ex.events(root, ex.Alphabet())
    report = ex.explore(["a", "b"], 1)
    assert report.transitions == report.histories == len(first)
    successors = {ex.normalise(mh.apply(root, action)[0]) for action in first}
    assert report.states == 1 + len(successors - {ex.normalise(root)})


def test_normalising_loses_no_history() -> None:
    """Normalised states are fewer, but the same histories are covered: the number of event
    sequences counted through the quotient equals the number counted through exact states."""
    exact = ex.explore(["a", "b"], 3, normalised=False)
    normalised = ex.explore(["a", "b"], 3)
    assert exact.violation is None and normalised.violation is None
    assert normalised.states < exact.states
    assert normalised.histories == exact.histories
    assert normalised.transitions < exact.transitions


def test_normalise_ignores_absolute_time_and_order_in_flight() -> None:
    steps = [tick("a"), tick("b"), deliver(0), track("a"), tick("a")]
    early = run(steps)
    late = run([{"do": "advance", "ms": 1000}, *steps])
    assert early.now != late.now
    assert ex.normalise(early) == ex.normalise(late)
    swapped = replace(early, in_flight=early.in_flight[::-1])
    assert swapped.in_flight != early.in_flight
    assert ex.normalise(swapped) == ex.normalise(early)
    assert ex.normalise(swapped, keep_order=True) != ex.normalise(early, keep_order=True)
    # Past permdown_period, how long exactly no longer matters.
    silent = run([*steps, {"do": "advance", "ms": CONFIG.permdown_period + 1}])
    longer = run([*steps, {"do": "advance", "ms": CONFIG.permdown_period + 500}])
    assert ex.normalise(silent) == ex.normalise(longer)


def test_command_line_prints_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert ex.main(["--nodes", "a,b", "--events", "2"]) == 0
    out = capsys.readouterr().out
    assert "states " in out and "transitions " in out
    assert "no violation" in out


def test_command_line_saves_the_shortest_failing_history(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(s, "merge", merge_without_observed_remove)
    path = tmp_path / "found.json"
    assert ex.main(["--nodes", "a,b", "--events", "3", "--save", str(path)]) == 1
    assert "VIOLATION at depth 3" in capsys.readouterr().out
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["format"] == mh.FORMAT and saved["name"].startswith("regression-")
    assert saved["steps"][:3] == [track("a"), tick("a"), untrack("a")]
    assert saved["expect"] == mh.run(saved)
    last = saved["expect"][-1]["nodes"]
    assert last["a"]["presences"] == [] and len(last["b"]["presences"]) == 1  # the ghost


# --- (ii) planted bugs are found ----------------------------------------------------------------


def merge_without_observed_remove(state: s.Replica, payload: s.Payload) -> tuple[s.Replica,
                                                                                 s.Diff]:
    """MG3 broken: a merge adds but never removes."""
    known = {r for r, _ in state.status}
    context = payload.context | {e.dot for e in payload.entries}
    incoming = {e for e in payload.entries if e.dot.replica in known}
    added = {e for e in incoming if e.dot not in state.context}
    new = replace(
        state,
        entries=state.entries | added,
        context=state.context | {d for d in context if d.replica in known},
    )
    return new, s._diff_of({e for e in added if s._reported(new, e)}, set())


def merge_readding_seen_dots(state: s.Replica, payload: s.Payload) -> tuple[s.Replica, s.Diff]:
    """MG2 broken: an entry is added whenever it is not stored, even if its dot was seen."""
    known = {r for r, _ in state.status}
    context = {d for d in payload.context | {e.dot for e in payload.entries} if d.replica in known}
    incoming = {e for e in payload.entries if e.dot.replica in known}
    dots = {e.dot for e in incoming}
    added = incoming - state.entries
    removed = {e for e in state.entries if e.dot in context and e.dot not in dots}
    new = replace(
        state,
        entries=(state.entries - removed) | added,
        context=state.context | context,
        delta_dots=state.delta_dots | {e.dot for e in removed},
    )
    return new, s._diff_of(
        {e for e in added if s._reported(new, e)}, {e for e in removed if s._reported(new, e)}
    )


def permdown_that_does_not_forget(state: s.Replica, replica: s.ReplicaId) -> tuple[s.Replica,
                                                                                   s.Diff]:
    """RL3 broken: the peer leaves the status table but its entries and dots stay."""
    status = state.status_of(replica)
    if status is None:
        return state, s.Diff()
    gone = s._entries_of(state, replica)
    return s._with_status(state, replica, None), s._diff_of(set(), gone if status == s.UP else
                                                            set())


def visible_ignoring_status(state: s.Replica) -> list[s.Entry]:
    """ST4 broken: down peers' entries are listed too."""
    return list(state.entries)


def update_without_removal_dot(
    state: s.Replica, owner: str, topic: str, key: str, meta: dict[str, Any]
) -> tuple[s.Replica, s.Diff]:
    """OP3 broken, as the model was before regression-d78fc3c1d024: no removal dot."""
    old = s._own_entry(state, topic, owner, key)
    if old is None:
        raise s.NotTracked((topic, owner, key))
    dot = s._next_dot(state)
    old_ref = str(s._meta_dict(old.meta)["phx_ref"])
    entry = s.Entry(dot, topic, owner, key,
                    s._make_meta(meta, phx_ref=s.ref_of(dot), phx_ref_prev=old_ref))
    new = replace(
        state,
        entries=(state.entries - {old}) | {entry},
        context=state.context | {dot},
        delta_dots=state.delta_dots | {old.dot, dot},
    )
    return new, s._diff_of({entry}, {old})


QUIET = ex.Alphabet(advances=(), cuts=False, stops=False)
"""Local operations, ticks and the network only."""

PLANTED = [
    # (name, model function, broken variant, checks to run, alphabet, the check that must fire,
    # the length of the shortest history)
    ("merge-without-observed-remove", "merge", merge_without_observed_remove, None,
     ex.Alphabet(), "converges", 3),
    ("merge-re-adds-seen-dots", "merge", merge_readding_seen_dots, None, ex.Alphabet(),
     "merge_laws", 5),
    ("merge-re-adds-seen-dots-resurrects", "merge", merge_readding_seen_dots,
     ("no_resurrection",), ex.Alphabet(), "no_resurrection", 6),
    ("permdown-does-not-forget", "replica_permdown", permdown_that_does_not_forget, None,
     ex.Alphabet(), "knows_what_it_holds", 5),
    ("visible-ignores-status", "visible", visible_ignoring_status, None, ex.Alphabet(),
     "lists_only_up_peers", 5),
    # The full alphabet finds it at the same depth (track, tick, update, tick, untrack, drop),
    # in about 5 s; the quiet one keeps the suite fast.
    ("update-without-removal-dot", "update", update_without_removal_dot, None, QUIET,
     "converges", 6),
]


@pytest.mark.parametrize(
    ("name", "attribute", "broken", "checks", "alphabet", "fires", "depth"),
    PLANTED,
    ids=[row[0] for row in PLANTED],
)
def test_planted_bug_is_found(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    attribute: str,
    broken: Any,
    checks: tuple[str, ...] | None,
    alphabet: ex.Alphabet,
    fires: str,
    depth: int,
) -> None:
    monkeypatch.setattr(s, attribute, broken)
    report = ex.explore(["a", "b"], 6, alphabet=alphabet, checks=checks, clock=time.perf_counter)
    print(name)
    print("\n".join(report.lines()))
    violation = report.violation
    assert violation is not None, f"the explorer missed {name}"
    assert any(m.startswith(f"{fires}: ") for m in violation.messages), violation.messages
    assert violation.depth == len(violation.steps) == depth
    if depth <= 4:  # breadth first: nothing shorter fails (by construction; cheap to confirm)
        assert ex.explore(["a", "b"], depth - 1, alphabet=alphabet, checks=checks).violation is None
    # The history reproduces the failure and is a valid regression file.
    cluster = inv.replay(["a", "b"], CONFIG, list(violation.steps))
    if fires == "converges":
        assert inv.converges(cluster)
        assert violation.settle
    elif fires in dict(inv.STATE_CHECKS):
        assert dict(inv.STATE_CHECKS)[fires](cluster)
    history = ex.regression(report)
    assert history["format"] == mh.FORMAT
    assert len(history["expect"]) == len(history["steps"]) == depth + len(violation.settle)
    assert json.loads(mh.dumps(history)) == json.loads(json.dumps(history))
    print(mh.dumps({"steps": list(violation.steps)}))


def test_real_model_passes_what_catches_the_planted_bugs() -> None:
    """The histories that expose the planted bugs are fine on the real model."""
    removed = run([track("a"), tick("a"), untrack("a")])
    assert inv.converges(removed) == []
    assert inv.check_state(removed) == []


# --- (iii) each invariant reports a violation on a hand-made cluster ----------------------------


def track(node: str) -> Step:
    return {"do": "track", "node": node, "owner": f"owner-{node}", "topic": "t", "key": "k",
            "meta": {"s": "in"}}


def untrack(node: str) -> Step:
    return {"do": "untrack", "node": node, "owner": f"owner-{node}", "topic": "t", "key": "k"}


def update(node: str) -> Step:
    return {"do": "update", "node": node, "owner": f"owner-{node}", "topic": "t", "key": "k",
            "meta": {"s": "up"}}


def tick(node: str) -> Step:
    return {"do": "tick", "node": node}


def deliver(index: int) -> Step:
    return {"do": "deliver", "index": index}


def run(steps: list[Step], nodes: tuple[str, ...] = ("a", "b")) -> c.Cluster:
    return inv.replay(list(nodes), CONFIG, steps)


SEEN = [track("a"), tick("a"), deliver(0)]
"""b knows a and stores a's entry."""
REMOVED = [*SEEN, untrack("a"), tick("a"), deliver(0)]
"""b has observed the removal of a's entry."""


def tampered(cluster: c.Cluster, name: str, **changes: Any) -> c.Cluster:
    """The cluster with fields of one node's replica replaced."""
    node = cluster.node(name)
    changed = replace(node, replica=replace(node.replica, **changes))
    return replace(cluster, nodes=tuple((n, changed if n == name else x) for n, x in
                                        cluster.nodes))


def a_entry() -> s.Entry:
    return next(iter(run(SEEN).node("b").replica.entries))


def test_the_hand_made_clusters_are_fine_untampered() -> None:
    for steps in (SEEN, REMOVED):
        cluster = run(steps)
        assert inv.check_state(cluster) == []
        assert inv.converges(cluster) == []


def test_no_resurrection() -> None:
    before = run(REMOVED)
    b = before.node("b").replica
    assert a_entry().dot in b.context and not b.entries
    after = tampered(before, "b", entries=b.entries | {a_entry()})
    assert inv.no_resurrection(before, after, c.Step())
    assert inv.no_resurrection(before, before, c.Step()) == []
    # Forgetting the replica (RL3) ends the memory of the removal: allowed.
    forgotten, _ = s.replica_permdown(b, a_entry().dot.replica)
    assert inv.no_resurrection(before, tampered(before, "b", **vars_of(forgotten)), c.Step()) == []


def vars_of(replica: s.Replica) -> dict[str, Any]:
    return {f: getattr(replica, f) for f in ("entries", "context", "delta_dots", "status")}


def test_removals_are_genuine() -> None:
    cluster = run(SEEN)
    assert inv.removals_are_genuine(cluster) == []
    assert inv.removals_are_genuine(tampered(cluster, "b", entries=frozenset()))
    # In a payload in flight too.
    in_flight = run([track("a"), tick("a")])
    envelope = in_flight.in_flight[0]
    assert isinstance(envelope.message, p.Heartbeat) and envelope.message.delta is not None
    hollow = envelope.message._replace(delta=envelope.message.delta._replace(entries=frozenset()))
    forged = replace(in_flight, in_flight=(envelope._replace(message=hollow),))
    assert inv.removals_are_genuine(forged)


def test_one_entry_per_dot() -> None:
    cluster = run(SEEN)
    other = a_entry()._replace(meta='{"phx_ref":"a.1.1","s":"forged"}')
    assert inv.one_entry_per_dot(tampered(cluster, "b", entries=frozenset({other})))
    assert inv.one_entry_per_dot(tampered(cluster, "b", entries=frozenset({other, a_entry()})))


def test_lists_only_up_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    down = run([*SEEN, {"do": "advance", "ms": CONFIG.down_period + 1}, tick("b")])
    assert down.node("b").replica.status_of(s.ReplicaId("a", 1)) == s.DOWN
    assert inv.lists_only_up_peers(down) == []
    monkeypatch.setattr(s, "visible", visible_ignoring_status)
    assert inv.lists_only_up_peers(down)


def test_knows_what_it_holds() -> None:
    cluster = run(SEEN)
    assert inv.knows_what_it_holds(tampered(cluster, "b", status=()))
    stale = run([*SEEN, {"do": "stop", "node": "a", "graceful": False}, {"do": "restart",
                                                                          "node": "a"},
                 tick("a"), deliver(0)])
    assert inv.knows_what_it_holds(stale) == []
    b = stale.node("b").replica
    both = ((s.ReplicaId("a", 1), s.UP), *b.status)
    assert inv.knows_what_it_holds(tampered(stale, "b", status=both))


def test_well_formed() -> None:
    cluster = run(SEEN)
    assert inv.well_formed(tampered(cluster, "b", context=frozenset()))
    a = cluster.node("a").replica
    assert inv.well_formed(tampered(cluster, "a", context=a.context | {s.Dot(a.me, 5)}))


def test_context_only_grows() -> None:
    before = run(REMOVED)
    b = before.node("b").replica
    shrunk = tampered(before, "b", context=frozenset(d for d in b.context if d.n != 2))
    assert inv.context_only_grows(before, shrunk, c.Step())
    restarted = run([*REMOVED, {"do": "stop", "node": "b", "graceful": False},
                     {"do": "restart", "node": "b"}])
    assert inv.context_only_grows(before, restarted, c.Step()) == []


def test_diffs_apply() -> None:
    before = run([track("a"), tick("a")])
    after, step = c.deliver(before, 0)
    assert inv.diffs_apply(before, after, step) == []
    assert inv.diffs_apply(before, after, c.Step())
    wrong = c.Step((("b", step.diffs[0][1]._replace(leaves=step.diffs[0][1].joins)),))
    assert inv.diffs_apply(before, after, wrong)


def test_converges() -> None:
    cluster = run(REMOVED)
    ghost = tampered(cluster, "b", entries=frozenset({a_entry()}))
    assert inv.not_converged(ghost)
    assert inv.converges(ghost)
    _, steps, stuck = inv.settle_steps(ghost, inv.settle_rounds(CONFIG))
    assert stuck == [] and steps[0] == {"do": "heal"}


def test_settle_rounds_derived_from_the_config() -> None:
    vectors = p.Config(broadcast_period=100, max_silent_periods=3, down_period=500,
                       permdown_period=1500, clock_sample_periods=2)
    assert inv.settle_rounds(vectors) == 12  # the cluster fuzzer's SETTLE_ROUNDS
    assert inv.settle_rounds(p.Config()) == 2 * (10 + 2) + 2  # 30 s down < 12 heartbeat rounds


def test_merge_laws(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = run([tick("a"), deliver(0), track("a"), tick("a"), update("a"), tick("a")])
    assert len([e for e in cluster.in_flight if e.destination == "b"]) == 2
    assert inv.merge_laws(cluster) == []

    def last_wins(state: s.Replica, payload: s.Payload) -> tuple[s.Replica, s.Diff]:
        own = {e for e in state.entries if e.dot.replica == state.me}
        return replace(state, entries=frozenset(own | payload.entries)), s.Diff()

    monkeypatch.setattr(s, "merge", last_wins)
    assert any("commute" in v for v in inv.merge_laws(cluster))


def test_join_payloads() -> None:
    e1, e2 = a_entry(), a_entry()._replace(dot=s.Dot(a_entry().dot.replica, 3))
    with_e1 = s.Payload(frozenset({e1}), frozenset({e1.dot}))
    removed_e1 = s.Payload(frozenset({e2}), frozenset({e1.dot, e2.dot}))
    joined = inv.join_payloads(with_e1, removed_e1)
    assert joined == inv.join_payloads(removed_e1, with_e1)
    assert joined.entries == frozenset({e2}) and joined.context == frozenset({e1.dot, e2.dot})


def test_forgetting_ends_the_memory_of_a_removal() -> None:
    """Why ``no_resurrection`` stops at RL3: b observes the removal of a's entry, permanently
    downs a after a silence, and a delayed copy of a's first heartbeat brings a back (FD3) with
    the removed entry, which b lists (and reports as a join) again until a transfer repairs it.
    Every invariant holds along the way, and the cluster converges."""
    steps = [
        track("a"), tick("a"), {"do": "duplicate", "index": 0}, deliver(0),
        untrack("a"), tick("a"), deliver(1),
        {"do": "advance", "ms": CONFIG.permdown_period + 1}, tick("b"), deliver(0),
    ]
    cluster = c.new_cluster(["a", "b"], CONFIG)
    for action in steps:
        after, step, _ = mh.apply(cluster, action)
        assert inv.check_transition(cluster, after, step) == []
        assert inv.check_state(after) == []
        cluster = after
    assert [x.meta for x in p.observe(cluster.node("b"))] == ['{"phx_ref":"a.1.1","s":"in"}']
    assert c.expected_view(cluster) == []
    assert inv.converges(cluster) == []
