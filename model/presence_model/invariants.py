"""Invariants of a model cluster, as checks an explorer (or a test) runs after every step.

Each check is a pure function over cluster values that returns a list of violations, one
human-readable string each; an empty list means the invariant holds. State checks take one
cluster; transition checks take the cluster before a step, the cluster after it, and what the
step reported. Checks speak only of *running* nodes: a stopped node keeps its last state but no
event reads it again (deliveries to it are lost, a restart replaces it, ``expected_view`` ignores
it), so nothing about it can be wrong that was not already wrong while it ran.

The checks are written from the rules of spec/protocol.md, not from the model's code: where a
check needs what a rule defines (the visible set, the join of two payloads) it computes it again
from the raw state, so that a broken model function is caught rather than trusted.

"No resurrection" is not an invariant the spec names; it follows from MG2-MG4 and RL3, and what
exactly holds is spelt out in ``no_resurrection`` and ``removals_are_genuine``: a removal a node
has observed is real (the origin no longer holds the entry) and final for as long as the node has
not forgotten the replica (RL3). Forgetting does end it: a node that permanently downed a replica
and hears it again (FD3) has no memory of the removal, and a stale copy of the entry (a delayed
heartbeat, a stale transfer) brings it back, visibly, until the origin's clock shows the node is
behind. That is the letter of RL3, FD3 and G2, so the checks allow it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from presence_model import cluster as c
from presence_model import history as mh
from presence_model import protocol as p
from presence_model import state as s

Json = Any

StateCheck = Callable[[c.Cluster], list[str]]
TransitionCheck = Callable[[c.Cluster, c.Cluster, c.Step], list[str]]


# --- helpers --------------------------------------------------------------------------------------


def _running(cluster: c.Cluster) -> Iterator[tuple[str, p.Node]]:
    """The running nodes in name order."""
    for name, node in cluster.nodes:
        if name in cluster.running:
            yield name, node


def _same_incarnation(before: c.Cluster, after: c.Cluster) -> Iterator[tuple[str, s.Replica,
                                                                          s.Replica]]:
    """ID1: the nodes that ran before and after a step as the same replica (not restarted) and
    whose replica state changed (an unchanged state, the same object, has nothing to check)."""
    for name, node in after.nodes:
        if name in before.running and name in after.running:
            old = before.node(name)
            if old.me == node.me and old.replica is not node.replica:
                yield name, old.replica, node.replica


def _ref(dot: s.Dot) -> str:
    return s.ref_of(dot)


def _replica_text(replica: s.ReplicaId) -> str:
    return f"{replica.name}.{replica.vsn}"


def _known(replica: s.Replica) -> set[s.ReplicaId]:
    return {r for r, _ in replica.status}


def _dots(entries: frozenset[s.Entry] | set[s.Entry]) -> set[s.Dot]:
    return {e.dot for e in entries}


def _presence(entry: s.Entry) -> s.Presence:
    return s.Presence(entry.topic, entry.key, entry.owner, entry.meta)


def _payloads_in_flight(cluster: c.Cluster) -> Iterator[tuple[str, c.Envelope, s.Payload]]:
    """Section 4: every payload on the network (heartbeat deltas and transfer replies), with a
    label naming its position in flight."""
    for index, envelope in enumerate(cluster.in_flight):
        message = envelope.message
        label = f"the payload in flight #{index} ({envelope.source}->{envelope.destination})"
        if isinstance(message, p.Heartbeat) and message.delta is not None:
            yield label, envelope, message.delta
        elif isinstance(message, p.TransferAck):
            yield label, envelope, message.payload


# --- (a) no resurrection --------------------------------------------------------------------------


def no_resurrection(before: c.Cluster, after: c.Cluster, step: c.Step) -> list[str]:
    """MG2 MG3 MG4 RL3 OP2 OP3 OP4 ID2: an observed removal is final.

    A node *has observed the removal* of a dot when the dot is in its context (ST1) but it stores
    no entry with that dot: the entry was removed (by its origin, OP2-OP4, or by a merge, MG3), or
    the dot is a removal dot that belongs to no entry. Then, for as long as the node runs as the
    same incarnation and has not permanently downed the dot's replica (RL3), the dot stays in its
    context (MG4: contexts only grow) and no entry with that dot ever comes back: a merge adds only
    entries whose dot it has not seen (MG2), and a local operation only creates entries under fresh
    dots (ID2). This holds for the node's own dots too.

    This is the strongest form that is true: it is *not* true across a permanent down. RL3
    forgets every dot of the replica (G2), and a replica heard again comes back empty (FD3), so a
    stale copy of the entry can be added again. ``removals_are_genuine`` is the other half: a
    removal a node has observed really happened at the origin.
    """
    del step
    violations = []
    for name, old, new in _same_incarnation(before, after):
        forgotten = _known(old) - _known(new)
        new_dots = _dots(new.entries)
        for dot in sorted(old.context - _dots(old.entries)):
            if dot.replica in forgotten:
                continue
            if dot in new_dots:
                entry = next(e for e in new.entries if e.dot == dot)
                violations.append(
                    f"{name} had observed the removal of {_ref(dot)} but stores it again "
                    f"({entry.topic}/{entry.key}/{entry.owner})"
                )
            elif dot not in new.context:
                violations.append(
                    f"{name} lost the observed removal {_ref(dot)} from its context without "
                    f"forgetting {_replica_text(dot.replica)}"
                )
    return violations


def removals_are_genuine(cluster: c.Cluster) -> list[str]:
    """MG3 DL1 DL2 DL3 OP2 OP3 OP4: every removal anyone has observed really happened.

    If a running node, or a payload in flight, has a dot of a running replica in its context
    without an entry for it, then that replica (the only one that creates or removes its entries,
    ID3) does not hold an entry with that dot: it removed it, or the dot is a removal dot. A
    delta carries every live entry among its dots (DL1), a full state every stored entry (DL3),
    a relay only dots a merge removed (DL2); so no payload can make a node drop an entry that is
    still alive at its origin. (Holding a stale entry the origin removed is allowed: the removal
    may still be on its way.)
    """
    origins = {node.me: node.replica for _, node in _running(cluster)}
    alive = {
        me: {e.dot for e in replica.entries if e.dot.replica == me}
        for me, replica in origins.items()
    }
    violations = []

    def check(where: str, entries: frozenset[s.Entry], context: frozenset[s.Dot]) -> None:
        held = _dots(entries)
        for dot in sorted(context - held):
            if dot in alive.get(dot.replica, set()):
                violations.append(
                    f"{where} has observed the removal of {_ref(dot)}, which is alive at its "
                    f"origin {_replica_text(dot.replica)}"
                )

    for name, node in _running(cluster):
        check(name, node.replica.entries, node.replica.context)
    for where, _, payload in _payloads_in_flight(cluster):
        check(where, payload.entries, payload.context | _dots(payload.entries))
    return violations


def one_entry_per_dot(cluster: c.Cluster) -> list[str]:
    """ID2 ID3 ST1: a dot names one entry everywhere: every running node and every payload in
    flight that holds an entry with a given dot holds the same entry, and a replica stores at most
    one entry per dot."""
    seen: dict[s.Dot, tuple[str, s.Entry]] = {}
    violations = []

    def check(where: str, entries: frozenset[s.Entry]) -> None:
        counts = Counter(e.dot for e in entries)
        for dot, count in sorted(counts.items()):
            if count > 1:
                violations.append(f"{where} holds {count} entries with dot {_ref(dot)}")
        for entry in sorted(entries):
            first = seen.setdefault(entry.dot, (where, entry))
            if first[1] != entry:
                violations.append(
                    f"{where} and {first[0]} hold different entries under dot {_ref(entry.dot)}"
                )

    for name, node in _running(cluster):
        check(name, node.replica.entries)
    for where, _, payload in _payloads_in_flight(cluster):
        check(where, payload.entries)
    return violations


# --- (b) only own entries and up peers' are listed ------------------------------------------------


def lists_only_up_peers(cluster: c.Cluster) -> list[str]:
    """ST4 ID5 RL2: a node lists exactly its own entries and those of peers it considers up,
    each once, in observation order; the entries of down peers are stored but hidden.

    The visible set is computed here from the stored entries and the status table, and compared
    with what the model's ``observe`` returns; every listed ``phx_ref`` must also name the node
    itself or an up peer.
    """
    violations = []
    for name, node in _running(cluster):
        replica = node.replica
        status = dict(replica.status)
        shown = p.observe(node)
        expected = Counter(
            _presence(e)
            for e in replica.entries
            if e.dot.replica == replica.me or status.get(e.dot.replica) == s.UP
        )
        if Counter(shown) != expected:
            extra = sorted(Counter(shown) - expected, key=s.observation_order)
            missing = sorted(expected - Counter(shown), key=s.observation_order)
            violations.append(
                f"{name} lists {_short(extra)} it must not and misses {_short(missing)}"
            )
        if shown != sorted(shown, key=s.observation_order):
            violations.append(f"{name} lists its presences out of order (ID5)")
        for presence in shown:
            ref = str(json.loads(presence.meta).get("phx_ref", ""))
            origin_name, _, rest = ref.rpartition(".")[0].rpartition(".")
            origin = s.ReplicaId(origin_name, int(rest)) if rest.isdigit() else None
            if origin != replica.me and (origin is None or status.get(origin) != s.UP):
                violations.append(
                    f"{name} lists {ref}, whose replica is neither itself nor an up peer "
                    f"(status {status.get(origin) if origin else None})"
                )
    return violations


# --- (c) nothing of unknown or forgotten replicas -------------------------------------------------


def knows_what_it_holds(cluster: c.Cluster) -> list[str]:
    """ST5 MG1 RL3 RL4 G2 FD1 FD2: a node stores entries and dots (in its entries, context and
    delta) only of itself and of the peers in its status table; so nothing remains of a replica
    it permanently downed (RL3 forgets it entirely). It never knows a superseded incarnation
    (an older vsn than the latest it has seen for that name, or its own name: RL4), nor a vsn
    that no node has run yet. Every known peer, and only a known peer, has a last-heard time
    (FD1, FD2), and only known peers have remembered clocks (GP4).
    """
    incarnations = dict(cluster.incarnation)
    violations = []
    for name, node in _running(cluster):
        replica = node.replica
        known = _known(replica)
        allowed = known | {replica.me}
        latest = dict(replica.latest_vsn)
        for what, dots in (
            ("an entry", _dots(replica.entries)),
            ("a context dot", set(replica.context)),
            ("a delta dot", set(replica.delta_dots)),
        ):
            strangers = sorted({d.replica for d in dots} - allowed)
            for stranger in strangers:
                violations.append(
                    f"{name} holds {what} of {_replica_text(stranger)}, which it does not know"
                )
        for peer in sorted(known):
            if peer.name == replica.me.name:
                violations.append(f"{name} knows {_replica_text(peer)}, of its own name")
            elif peer.vsn < latest.get(peer.name, peer.vsn):
                violations.append(
                    f"{name} still knows {_replica_text(peer)} though it has seen vsn "
                    f"{latest[peer.name]} of {peer.name}"
                )
            elif peer.vsn > latest.get(peer.name, -1):
                violations.append(f"{name} knows {_replica_text(peer)} beyond its latest_vsn")
        for other, vsn in sorted(latest.items()):
            if vsn > incarnations.get(other, -1):
                violations.append(f"{name} has seen {other}.{vsn}, which never ran")
        heard = {r for r, _ in node.last_heard}
        if heard != known:
            violations.append(
                f"{name} has last-heard times for {sorted(map(_replica_text, heard))} but knows "
                f"{sorted(map(_replica_text, known))}"
            )
        remembered = {r for r, _ in node.clocks_heard}
        if not remembered <= known:
            violations.append(
                f"{name} remembers clocks of unknown "
                f"{sorted(map(_replica_text, remembered - known))}"
            )
    return violations


def well_formed(cluster: c.Cluster) -> list[str]:
    """ST1 ST2 DL1 ID1 ID2 ID3: every stored entry's dot is in the context, every delta dot is in
    the context, a replica's own dots are exactly 1..n (each local operation consumes the next
    counter, none is ever skipped or learnt from a peer), its own live entries have distinct
    handles, and every running node runs its cluster's current incarnation."""
    incarnations = dict(cluster.incarnation)
    violations = []
    for name, node in _running(cluster):
        replica = node.replica
        if replica.me != s.ReplicaId(name, incarnations[name]):
            violations.append(f"{name} runs {_replica_text(replica.me)}, not its incarnation")
        outside = sorted(_dots(replica.entries) - replica.context)
        if outside:
            violations.append(f"{name} stores entries outside its context: {outside}")
        if not replica.delta_dots <= replica.context:
            violations.append(f"{name} has delta dots outside its context")
        own = sorted(d.n for d in replica.context if d.replica == replica.me)
        if own != list(range(1, len(own) + 1)):
            violations.append(f"{name}'s own counters are not 1..n: {own}")
        handles = Counter(
            (e.topic, e.owner, e.key) for e in replica.entries if e.dot.replica == replica.me
        )
        for handle, count in handles.items():
            if count > 1:
                violations.append(f"{name} has {count} live entries for handle {handle}")
    return violations


# --- (d) contexts only grow -----------------------------------------------------------------------


def context_only_grows(before: c.Cluster, after: c.Cluster, step: c.Step) -> list[str]:
    """MG4 RL3 RL4 ST1: between two steps a node's causal context only grows, except for the
    dots of a replica the node permanently downed in that step (RL3, also through RL4), and
    except when the node restarted (a new incarnation starts empty, ID1). ``latest_vsn`` only
    grows too (RL4)."""
    del step
    violations = []
    for name, old, new in _same_incarnation(before, after):
        forgotten = _known(old) - _known(new)
        lost = {d for d in old.context - new.context if d.replica not in forgotten}
        if lost:
            violations.append(
                f"{name} lost {sorted(map(_ref, lost))} from its context without forgetting "
                "their replica"
            )
        latest = dict(new.latest_vsn)
        for other, vsn in old.latest_vsn:
            if latest.get(other, -1) < vsn:
                violations.append(f"{name}'s latest_vsn of {other} went back from {vsn}")
    return violations


# --- (e) diffs explain observations ---------------------------------------------------------------


def diffs_apply(before: c.Cluster, after: c.Cluster, step: c.Step) -> list[str]:
    """DF1 MG5 RL1 RL2 RL3: the one diff a step reports for a node, applied to the node's previous
    observation, gives its new one: every leave was listed, every join was not (after the
    leaves), nothing is both joined and left, and a node that reports nothing lists the same as
    before. A restarted node is a new observer and is not compared (ID1)."""
    diffs = dict(step.diffs)
    violations = []
    for name, node in after.nodes:
        old = before.node(name)
        if old.me != node.me:
            continue
        diff = diffs.get(name, s.Diff())
        if old.replica is node.replica and diff == s.Diff():
            continue  # the same state object lists the same, and nothing was reported
        listed = Counter(p.observe(old))
        both = set(diff.joins) & set(diff.leaves)
        if both:
            violations.append(f"{name}'s diff joins and leaves {_short(sorted(both))}")
        for presence in diff.leaves:
            if listed[presence] <= 0:
                violations.append(f"{name} reports a leave of {_short([presence])}, not listed")
            listed[presence] -= 1
        for presence in diff.joins:
            if listed[presence] > 0:
                violations.append(f"{name} reports a join of {_short([presence])}, already listed")
            listed[presence] += 1
        if +listed != Counter(p.observe(node)):
            violations.append(
                f"{name}'s diff (joins {_short(list(diff.joins))}, leaves "
                f"{_short(list(diff.leaves))}) does not turn {_short(p.observe(old))} into "
                f"{_short(p.observe(node))}"
            )
    return violations


# --- (f) convergence ------------------------------------------------------------------------------


def settle_rounds(config: p.Config) -> int:
    """IN1 FD1 GP2 GP4 GP5: the number of settle rounds after which a healed, quiet cluster must
    have converged, derived from the timing options.

    Each round is one ``broadcast_period``: time advances, every running node ticks, and every
    message (and every reply it provokes) is delivered. Messages in flight at the heal are
    delivered in round 1, so the last sign of life of a stopped incarnation is at round 1 at the
    latest; it is down (hidden) at the first tick more than ``down_period`` later: round
    ``down_period // broadcast_period + 2``. Meanwhile every running node heartbeats within
    ``max_silent_periods`` rounds (GP2), and never goes down again (``down_period >
    max_silent_periods * broadcast_period``); a node samples the clocks it heard within
    ``clock_sample_periods`` rounds (GP4) and the transfer completes within that round. A node
    that copied from a peer that was still catching up needs one more heartbeat and sample, hence
    twice that, plus one round of slack.
    """
    hide = config.down_period // config.broadcast_period + 2
    catch_up = 2 * (config.max_silent_periods + config.clock_sample_periods) + 1
    return max(hide, catch_up) + 1


MAX_DELIVERIES_PER_ROUND = 1000


def settle_round(cluster: c.Cluster) -> tuple[c.Cluster, list[Json], list[str]]:
    """IN1 GP2: one settle round: advance one broadcast_period, tick every running node in name
    order, deliver the oldest message until none is in flight. Returns the cluster, the steps,
    and a violation if the network does not go quiet."""
    steps: list[Json] = [{"do": "advance", "ms": cluster.config.broadcast_period}]
    cluster = c.advance(cluster, cluster.config.broadcast_period)
    for name in sorted(cluster.running):
        steps.append({"do": "tick", "node": name})
        cluster, _ = c.tick(cluster, name)
    deliveries = 0
    while cluster.in_flight:
        if deliveries == MAX_DELIVERIES_PER_ROUND:
            return cluster, steps, [f"the network is not quiet after {deliveries} deliveries"]
        steps.append({"do": "deliver", "index": 0})
        cluster, _ = c.deliver(cluster, 0)
        deliveries += 1
    return cluster, steps, []


def settle_steps(cluster: c.Cluster, rounds: int) -> tuple[c.Cluster, list[Json], list[str]]:
    """IN1: the deterministic settle: heal, then ``rounds`` rounds (``settle_round``). Returns the
    settled cluster, the history steps that got there (so a failure can be replayed), and a
    violation if the network never went quiet."""
    steps: list[Json] = [{"do": "heal"}]
    cluster = c.set_cut(cluster, frozenset())
    for _ in range(rounds):
        cluster, more, stuck = settle_round(cluster)
        steps.extend(more)
        if stuck:
            return cluster, steps, stuck
    return cluster, steps, []


def not_converged(cluster: c.Cluster) -> list[str]:
    """IN1: every running node lists exactly ``expected_view``, the live local entries of every
    running node."""
    expected = c.expected_view(cluster)
    violations = []
    for name, node in _running(cluster):
        shown = p.observe(node)
        if shown != expected:
            extra = sorted(Counter(shown) - Counter(expected), key=s.observation_order)
            missing = sorted(Counter(expected) - Counter(shown), key=s.observation_order)
            violations.append(
                f"{name} has not converged: lists {_short(extra)} too many and misses "
                f"{_short(missing)}"
            )
    return violations


def _short(presences: list[s.Presence]) -> list[str]:
    return [f"{x.topic}/{x.key}/{x.owner}@{json.loads(x.meta).get('phx_ref')}" for x in presences]


def converges(cluster: c.Cluster, rounds: int | None = None) -> list[str]:
    """IN1 ST4 RL2 FD1 GP2 GP4 GP5: from this cluster, the deterministic settle (``settle_steps``,
    ``settle_rounds(config)`` rounds unless given) makes every running node list exactly
    ``expected_view``."""
    count = settle_rounds(cluster.config) if rounds is None else rounds
    settled, _, stuck = settle_steps(cluster, count)
    return stuck or not_converged(settled)


# --- (g) merge laws -------------------------------------------------------------------------------


def join_payloads(first: s.Payload, second: s.Payload) -> s.Payload:
    """MG2 MG3 MG4 MG6: the join of two payloads, written from the rules: an entry survives if
    both hold it, or if one holds it and the other has not seen its dot; contexts unite."""
    first_context = first.context | _dots(first.entries)
    second_context = second.context | _dots(second.entries)
    second_dots = _dots(second.entries)
    first_dots = _dots(first.entries)
    entries = {
        e for e in first.entries if e.dot in second_dots or e.dot not in second_context
    } | {e for e in second.entries if e.dot in first_dots or e.dot not in first_context}
    return s.Payload(frozenset(entries), first_context | second_context)


def _stored(replica: s.Replica) -> tuple[frozenset[s.Entry], frozenset[s.Dot]]:
    return replica.entries, replica.context


def _merged(replica: s.Replica, *payloads: s.Payload) -> s.Replica:
    for payload in payloads:
        replica, _ = s.merge(replica, payload)
    return replica


def merge_laws(cluster: c.Cluster) -> list[str]:
    """MG6 MG2 MG3 MG4: on the payloads that actually occur, merge is idempotent, commutative and
    associative on the stored state (entries and context).

    For every running node, take the payloads in flight to it plus the node's own stored state as
    a payload (a payload with nothing new for it). For each payload ``x``: merging it twice is
    merging it once. For each pair ``x, y``: merging ``x`` then ``y`` equals ``y`` then ``x``,
    and equals merging their join (``join_payloads``) at once. With ``y`` the node's own state,
    the last is the delta rule: a payload that contains a delta and nothing else new merges like
    the delta.
    """
    violations = []
    for name, node in _running(cluster):
        replica = node.replica
        own = s.Payload(replica.entries, replica.context)
        labelled = [("its own state", own)] + [
            (label, payload)
            for label, envelope, payload in _payloads_in_flight(cluster)
            if envelope.destination == name
        ]
        unique: dict[s.Payload, str] = {}
        for label, payload in labelled:
            unique.setdefault(payload, label)
        candidates = [(label, payload) for payload, label in unique.items()]
        for label, x in candidates:
            once = _merged(replica, x)
            if _stored(_merged(once, x)) != _stored(once):
                violations.append(f"{name}: merging {label} twice differs from once")
        for i, (label_x, x) in enumerate(candidates):
            for label_y, y in candidates[i + 1 :]:
                xy = _stored(_merged(replica, x, y))
                if xy != _stored(_merged(replica, y, x)):
                    violations.append(f"{name}: merging {label_x} and {label_y} does not commute")
                if xy != _stored(_merged(replica, join_payloads(x, y))):
                    violations.append(
                        f"{name}: merging {label_x} then {label_y} differs from merging their "
                        "join"
                    )
    return violations


# --- the lists the explorer runs ------------------------------------------------------------------


STATE_CHECKS: tuple[tuple[str, StateCheck], ...] = (
    ("removals_are_genuine", removals_are_genuine),
    ("one_entry_per_dot", one_entry_per_dot),
    ("lists_only_up_peers", lists_only_up_peers),
    ("knows_what_it_holds", knows_what_it_holds),
    ("well_formed", well_formed),
    ("merge_laws", merge_laws),
)
"""IN1 ST4 ST5 MG6: the checks of one cluster (convergence, the costly one, is run apart)."""

TRANSITION_CHECKS: tuple[tuple[str, TransitionCheck], ...] = (
    ("no_resurrection", no_resurrection),
    ("context_only_grows", context_only_grows),
    ("diffs_apply", diffs_apply),
)
"""MG2 MG4 RL3 DF1: the checks of one step."""


def check_state(cluster: c.Cluster) -> list[str]:
    """IN1 ST4 ST5 MG6: every state check, each violation prefixed with the check's name."""
    return [f"{label}: {v}" for label, check in STATE_CHECKS for v in check(cluster)]


def check_transition(before: c.Cluster, after: c.Cluster, step: c.Step) -> list[str]:
    """MG2 MG4 RL3 DF1: every transition check, each violation prefixed with the check's name."""
    return [
        f"{label}: {v}" for label, check in TRANSITION_CHECKS for v in check(before, after, step)
    ]


def replay(nodes: list[str], config: p.Config, steps: list[Json]) -> c.Cluster:
    """IN2: the cluster a list of history steps leads to (``presence_model.history`` format)."""
    cluster = c.new_cluster(nodes, config)
    for action in steps:
        cluster, _, _ = mh.apply(cluster, action)
    return cluster
