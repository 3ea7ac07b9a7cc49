"""The replicated state of one replica, as plainly as it can be written.

Everything is an immutable value and every operation is a pure function returning the new state
and what it reports. Sets are plain sets of dots; there is no compaction, no index and no
cleverness, so that each function can be checked against its rule in spec/protocol.md by reading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

UP = "up"
DOWN = "down"


class ReplicaId(NamedTuple):
    """ID1: one incarnation of a node."""

    name: str
    vsn: int


class Dot(NamedTuple):
    """ID2: the n-th counter value consumed by a replica."""

    replica: ReplicaId
    n: int


Meta = str
"""A meta map as canonical JSON (sorted keys), so that states stay hashable."""


class Entry(NamedTuple):
    """ID3: a presence entry; the dot is its identity, (topic, owner, key) its handle."""

    dot: Dot
    topic: str
    owner: str
    key: str
    meta: Meta


class Presence(NamedTuple):
    """ID5: what an observer sees of an entry."""

    topic: str
    key: str
    owner: str
    meta: Meta


class Diff(NamedTuple):
    """Presences that became visible (joins) and invisible (leaves), as sorted tuples."""

    joins: tuple[Presence, ...] = ()
    leaves: tuple[Presence, ...] = ()


class Payload(NamedTuple):
    """Section 4: a delta or a full state."""

    entries: frozenset[Entry]
    context: frozenset[Dot]


@dataclass(frozen=True)
class Replica:
    """ST1: the state of one replica."""

    me: ReplicaId
    entries: frozenset[Entry] = frozenset()
    context: frozenset[Dot] = frozenset()
    delta_dots: frozenset[Dot] = frozenset()
    status: tuple[tuple[ReplicaId, str], ...] = ()
    latest_vsn: tuple[tuple[str, int], ...] = ()
    departed: frozenset[ReplicaId] = frozenset()

    def status_of(self, replica: ReplicaId) -> str | None:
        return dict(self.status).get(replica)


class AlreadyTracked(Exception):
    """OP1: the handle is already tracked locally."""


class NotTracked(Exception):
    """OP3: the handle is not tracked locally."""


# --- helpers ------------------------------------------------------------------------------------


def ref_of(dot: Dot) -> str:
    """ID4: the opaque ref of a dot."""
    return f"{dot.replica.name}.{dot.replica.vsn}.{dot.n}"


def _make_meta(meta: dict[str, Any], **refs: str) -> Meta:
    """ID4: the caller's meta with the refs set; refs the caller gave are never kept."""
    fields = {k: v for k, v in meta.items() if k not in ("phx_ref", "phx_ref_prev")}
    return json.dumps({**fields, **refs}, sort_keys=True, separators=(",", ":"))


def _meta_dict(meta: Meta) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(meta)
    return loaded


def _presence_of(entry: Entry) -> Presence:
    return Presence(entry.topic, entry.key, entry.owner, entry.meta)


def observation_order(presence: Presence) -> tuple[str, str, str, str]:
    """ID5: observations are ordered by (topic, key, owner, phx_ref)."""
    return (presence.topic, presence.key, presence.owner, str(_meta_dict(presence.meta)["phx_ref"]))


def _diff_of(joined: set[Entry], left: set[Entry]) -> Diff:
    return Diff(
        tuple(sorted((_presence_of(e) for e in joined), key=observation_order)),
        tuple(sorted((_presence_of(e) for e in left), key=observation_order)),
    )


def _with_status(state: Replica, replica: ReplicaId, status: str | None) -> Replica:
    table = dict(state.status)
    if status is None:
        table.pop(replica, None)
    else:
        table[replica] = status
    return replace(state, status=tuple(sorted(table.items())))


def _next_dot(state: Replica) -> Dot:
    """OP: the next counter value of the local replica (one more than any it consumed)."""
    own = [dot.n for dot in state.context if dot.replica == state.me]
    return Dot(state.me, max(own, default=0) + 1)


def _own_entry(state: Replica, topic: str, owner: str, key: str) -> Entry | None:
    for entry in state.entries:
        if entry.dot.replica == state.me and (entry.topic, entry.owner, entry.key) == (
            topic,
            owner,
            key,
        ):
            return entry
    return None


def _reported(state: Replica, entry: Entry) -> bool:
    """MG5: diffs only speak of entries that are (or were) visible: own ones and up peers'."""
    return entry.dot.replica == state.me or state.status_of(entry.dot.replica) == UP


# --- section 2: the state -----------------------------------------------------------------------


def new_replica(me: ReplicaId) -> Replica:
    """ST2: a fresh replica knows nothing."""
    return Replica(me=me, latest_vsn=((me.name, me.vsn),))


def clock(state: Replica) -> dict[ReplicaId, int]:
    """ST3: contiguous counters of the replica itself and of its up peers."""
    result = {}
    for replica in [state.me] + [r for r, s in state.status if s == UP]:
        n = 0
        while Dot(replica, n + 1) in state.context:
            n += 1
        result[replica] = n
    return result


def visible(state: Replica) -> list[Entry]:
    """ST4: own entries and those of up peers."""
    return [e for e in state.entries if _reported(state, e)]


def observe(state: Replica) -> list[Presence]:
    """ID5, ST4: the visible presences in observation order."""
    return sorted((_presence_of(e) for e in visible(state)), key=observation_order)


# --- section 3: local operations ----------------------------------------------------------------


def track(
    state: Replica, owner: str, topic: str, key: str, meta: dict[str, Any]
) -> tuple[Replica, Diff]:
    """OP1: add an entry under a new dot; fail if the handle is tracked."""
    if _own_entry(state, topic, owner, key) is not None:
        raise AlreadyTracked((topic, owner, key))
    dot = _next_dot(state)
    entry = Entry(dot, topic, owner, key, _make_meta(meta, phx_ref=ref_of(dot)))
    new = replace(
        state,
        entries=state.entries | {entry},
        context=state.context | {dot},
        delta_dots=state.delta_dots | {dot},
    )
    return new, _diff_of({entry}, set())


def untrack(state: Replica, owner: str, topic: str, key: str) -> tuple[Replica, Diff]:
    """OP2: remove an entry and consume a removal dot; nothing if it is not tracked."""
    entry = _own_entry(state, topic, owner, key)
    if entry is None:
        return state, Diff()
    return _remove_own(state, {entry})


def untrack_owner(state: Replica, owner: str) -> tuple[Replica, Diff]:
    """OP4: the owner ended: remove all its entries under one removal dot."""
    gone = {e for e in state.entries if e.dot.replica == state.me and e.owner == owner}
    if not gone:
        return state, Diff()
    return _remove_own(state, gone)


def _remove_own(state: Replica, gone: set[Entry]) -> tuple[Replica, Diff]:
    """OP2, OP4: the removed dots and one new removal dot go into the delta."""
    removal = _next_dot(state)
    removed_dots = {e.dot for e in gone}
    new = replace(
        state,
        entries=state.entries - gone,
        context=state.context | {removal},
        delta_dots=state.delta_dots | removed_dots | {removal},
    )
    return new, _diff_of(set(), gone)


def update(
    state: Replica, owner: str, topic: str, key: str, meta: dict[str, Any]
) -> tuple[Replica, Diff]:
    """OP3: replace an entry atomically: a removal dot for the old one, then a new dot."""
    old = _own_entry(state, topic, owner, key)
    if old is None:
        raise NotTracked((topic, owner, key))
    removal = _next_dot(state)
    dot = Dot(state.me, removal.n + 1)
    old_ref = str(_meta_dict(old.meta)["phx_ref"])
    new_entry = Entry(
        dot, topic, owner, key, _make_meta(meta, phx_ref=ref_of(dot), phx_ref_prev=old_ref)
    )
    new = replace(
        state,
        entries=(state.entries - {old}) | {new_entry},
        context=state.context | {removal, dot},
        delta_dots=state.delta_dots | {old.dot, removal, dot},
    )
    return new, _diff_of({new_entry}, {old})


# --- section 4: deltas and full states ----------------------------------------------------------


def take_delta(state: Replica) -> tuple[Replica, Payload | None]:
    """DL1: the live entries and all dots touched since the last take."""
    if not state.delta_dots:
        return state, None
    entries = frozenset(e for e in state.entries if e.dot in state.delta_dots)
    return replace(state, delta_dots=frozenset()), Payload(entries, state.delta_dots)


def full_state(state: Replica, requester: ReplicaId | None) -> Payload:
    """DL3: everything stored, less the requester's own entries and dots."""
    return Payload(
        frozenset(e for e in state.entries if e.dot.replica != requester),
        frozenset(d for d in state.context if d.replica != requester),
    )


# --- section 5: merge ---------------------------------------------------------------------------


def merge(state: Replica, payload: Payload) -> tuple[Replica, Diff]:
    """MG1 MG2 MG3 MG4 MG5 MG6 DL2 ST5: join a payload into the state; report what became
    visible or invisible."""
    known = {r for r, _ in state.status}  # MG1: known peers only, never the replica itself
    payload_context = payload.context | {e.dot for e in payload.entries}
    incoming = {e for e in payload.entries if e.dot.replica in known}
    context_in = {d for d in payload_context if d.replica in known}
    payload_dots = {e.dot for e in incoming}

    added = {e for e in incoming if e.dot not in state.context}  # MG2
    removed = {  # MG3
        e for e in state.entries if e.dot in context_in and e.dot not in payload_dots
    }
    new = replace(
        state,
        entries=(state.entries - removed) | added,
        context=state.context | context_in,  # MG4
        delta_dots=state.delta_dots | {e.dot for e in removed},  # DL2
    )
    # MG5: only changes of the visible set are _reported.
    return new, _diff_of(
        {e for e in added if _reported(new, e)}, {e for e in removed if _reported(new, e)}
    )


# --- section 6: replica lifecycle ---------------------------------------------------------------


def _entries_of(state: Replica, replica: ReplicaId) -> set[Entry]:
    return {e for e in state.entries if e.dot.replica == replica}


def replica_up(state: Replica, replica: ReplicaId) -> tuple[Replica, Diff]:
    """RL1: an unknown peer becomes known; a down one comes back with its entries."""
    status = state.status_of(replica)
    if status == UP:
        return state, Diff()
    new = _with_status(state, replica, UP)
    if status is None:
        return new, Diff()
    return new, _diff_of(_entries_of(new, replica), set())


def replica_down(state: Replica, replica: ReplicaId) -> tuple[Replica, Diff]:
    """RL2: an up peer goes down; its entries are hidden but kept."""
    if state.status_of(replica) != UP:
        return state, Diff()
    return _with_status(state, replica, DOWN), _diff_of(set(), _entries_of(state, replica))


def replica_permdown(state: Replica, replica: ReplicaId) -> tuple[Replica, Diff]:
    """RL3: forget everything of a peer; leaves only if it was up."""
    status = state.status_of(replica)
    if status is None:
        return state, Diff()
    gone = _entries_of(state, replica)
    new = _with_status(state, replica, None)
    new = replace(
        new,
        entries=new.entries - gone,
        context=frozenset(d for d in new.context if d.replica != replica),
        delta_dots=frozenset(d for d in new.delta_dots if d.replica != replica),
    )
    return new, _diff_of(set(), gone if status == UP else set())


def _raise_vsn(state: Replica, replica: ReplicaId) -> tuple[tuple[str, int], ...]:
    table = dict(state.latest_vsn)
    table[replica.name] = max(table.get(replica.name, replica.vsn), replica.vsn)
    return tuple(sorted(table.items()))


def observe_incarnation(state: Replica, replica: ReplicaId) -> tuple[Replica, bool, Diff]:
    """RL4: ignore own name and older incarnations; a newer one retires the older at once.

    Returns the new state, whether the replica is accepted, and the diff of retiring an older
    incarnation. It does not register the replica: the caller brings it up (RL1).
    """
    if replica.name == state.me.name:
        return state, False, Diff()
    latest = dict(state.latest_vsn).get(replica.name)
    if (latest is not None and replica.vsn < latest) or replica in state.departed:
        return state, False, Diff()
    diff = Diff()
    for older, _ in state.status:
        if older.name == replica.name and older.vsn < replica.vsn:
            state, retired = replica_permdown(state, older)
            diff = Diff(diff.joins + retired.joins, diff.leaves + retired.leaves)
    departed = frozenset(d for d in state.departed if d.name != replica.name or d == replica)
    return replace(state, latest_vsn=_raise_vsn(state, replica), departed=departed), True, diff


def retire_incarnation(state: Replica, replica: ReplicaId) -> tuple[Replica, Diff]:
    """RL5 RL4: an incarnation that announced its departure never comes back: it is the departed one
    of its name, so anything later from it (overtaken by the announcement) is ignored; and it
    is permanently down now."""
    departed = frozenset(d for d in state.departed if d.name != replica.name) | {replica}
    state = replace(state, latest_vsn=_raise_vsn(state, replica), departed=departed)
    diff = Diff()
    for gone, _ in state.status:  # it and any older incarnation of its name (RL4)
        if gone.name == replica.name and gone.vsn <= replica.vsn:
            state, left = replica_permdown(state, gone)
            diff = Diff(diff.joins + left.joins, diff.leaves + left.leaves)
    return state, diff
