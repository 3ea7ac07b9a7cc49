"""The replicated state of one replica: an observed-remove set of dotted entries (spec 2-6).

Why each peer status transition exists (RL1-RL4):

- *unknown -> up* (``replica_up``): a replica only stores what it knows how to forget. Entries
  and dots of a replica it has not heard from are dropped on arrival (ST5), so its first heartbeat
  registers it, with nothing stored; its entries then arrive by delta or transfer.
- *up -> down* (``replica_down``): a silent peer may be partitioned rather than dead. Its entries
  stay stored but hidden, and are reported as leaves once, so clients stop seeing ghosts.
- *down -> up* (``replica_up``): the partition healed; the hidden entries are still current as far
  as anyone knows, so they are reported as joins again, with no transfer needed.
- *known -> forgotten* (``replica_permdown``): the peer is gone for good (long silence, a graceful
  stop, or a newer incarnation of its node). Everything about it is dropped, so the state does not
  grow with every restart in the cluster; only the latest vsn per node name is kept, so a delayed
  message from an older incarnation cannot bring it back (RL4).

Representation, chosen for merge and track throughput:

- entries per replica, ``counter -> Entry``; the local replica's own entries in their own dict,
  whose insertion order is ascending counter (new dots are always the largest), so the entries of
  the pending delta are its tail;
- a topic index ``topic -> (replica, counter) -> Entry`` for ``list``;
- indexes of the local entries by handle ``(topic, owner, key) -> counter`` and by owner (a list
  of counters: an owner usually holds few entries);
- the context of each peer as a version vector plus a set of out-of-order counters, compacted
  eagerly (T29, T30); the local replica's own context is always the contiguous range ``1..counter``;
- the pending delta as the counter at the last take (own dots consumed since are that range) plus
  the removed dots outside it.

Nothing here validates its input: the codec does that at the boundary.
"""

from __future__ import annotations

import builtins
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from operator import itemgetter

from presence.core.types import (
    EMPTY_DIFF,
    AlreadyTracked,
    Diff,
    DotRanges,
    Entry,
    Meta,
    NotTracked,
    Payload,
    Presence,
    ReplicaId,
    Status,
    ref_of,
)

_UP = Status.UP
_DOWN = Status.DOWN

Dot = tuple[ReplicaId, int]


def _to_ranges(counters: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, disjoint, inclusive ranges covering exactly ``counters``."""
    ranges: list[tuple[int, int]] = []
    for counter in sorted(counters):
        if ranges and counter == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], counter)
        else:
            ranges.append((counter, counter))
    return ranges


def _union(
    a: builtins.list[tuple[int, int]], b: builtins.list[tuple[int, int]]
) -> builtins.list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent ranges covering both inputs."""
    merged: builtins.list[tuple[int, int]] = []
    for first, last in sorted(a + b):
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def _ranges_hold(ranges: Sequence[tuple[int, int]], counter: int) -> bool:
    """Whether sorted disjoint ``ranges`` contain ``counter``."""
    index = bisect_right(ranges, counter, key=itemgetter(0)) - 1
    return index >= 0 and counter <= ranges[index][1]


def _ranges_counters(ranges: DotRanges) -> Iterator[int]:
    for first, last in ranges:
        yield from range(first, last + 1)


def _presence(entry: Entry) -> Presence:
    return Presence(entry.topic, entry.key, entry.owner, entry.meta)


def _observation_key(entry: Entry) -> tuple[str, str, str, str]:
    return (entry.topic, entry.key, entry.owner, ref_of(entry.replica, entry.counter))


class State:
    """The CRDT state of one replica (ST1), its local operations (OP1-OP4), deltas and full
    states (DL1-DL3), merge (MG1-MG6) and the peer lifecycle (RL1-RL4)."""

    __slots__ = (
        "_by_handle",
        "_by_owner",
        "_by_topic",
        "_cloud",
        "_counter",
        "_delta_own_removed",
        "_delta_peer_removed",
        "_delta_start",
        "_departed",
        "_latest_vsn",
        "_own",
        "_peer_entries",
        "_ref_prefix",
        "_status",
        "_vv",
        "replica",
    )

    def __init__(self, replica: ReplicaId) -> None:
        """ST2: no entries, an empty context, an empty delta, no known peer."""
        self.replica = replica
        self._ref_prefix = f"{replica.name}.{replica.vsn}."
        # Own context is exactly 1..counter: only this replica consumes its dots, in order.
        self._counter = 0
        self._own: dict[int, Entry] = {}
        # Local entries by handle (topic, owner, key) (ID3), and each owner's counters.
        self._by_handle: dict[tuple[str, str, str], int] = {}
        self._by_owner: dict[str, builtins.list[int]] = {}
        # One key per known peer in each of these three, so a lookup doubles as "is it known".
        self._status: dict[ReplicaId, Status] = {}
        self._peer_entries: dict[ReplicaId, dict[int, Entry]] = {}
        self._vv: dict[ReplicaId, int] = {}
        # Out-of-order counters above the version vector, as sorted disjoint ranges that never
        # touch the vector (ranges, not sets: a peer's range costs the same whatever its span).
        self._cloud: dict[ReplicaId, builtins.list[tuple[int, int]]] = {}
        self._by_topic: dict[str, dict[Dot, Entry]] = {}
        self._latest_vsn: dict[str, int] = {replica.name: replica.vsn}
        # RL5: per name, the vsn of an incarnation that announced its departure (the latest).
        self._departed: dict[str, int] = {}
        # delta_dots = own (delta_start, counter] + these removed dots older than the window.
        self._delta_start = 0
        self._delta_own_removed: set[int] = set()
        self._delta_peer_removed: dict[ReplicaId, set[int]] = {}

    # --- local operations (section 3) ----------------------------------------------------------

    def track(self, owner: str, topic: str, key: str, meta: Meta) -> Diff:
        """OP1: add an entry with a new dot; ``phx_ref`` set per ID4. Raises AlreadyTracked."""
        handle = (topic, owner, key)
        if handle in self._by_handle:
            raise AlreadyTracked(topic, owner, key)
        counter = self._counter = self._counter + 1
        stored = dict(meta)
        stored.pop("phx_ref_prev", None)  # ID4: a caller's ref never survives; a join has none
        stored["phx_ref"] = self._ref_prefix + str(counter)
        # tuple.__new__ skips the Python-level NamedTuple constructor: this is the hot path.
        entry = tuple.__new__(Entry, (self.replica, counter, topic, owner, key, stored))
        self._by_handle[handle] = counter
        counters = self._by_owner.get(owner)
        if counters is None:
            self._by_owner[owner] = [counter]
        else:
            counters.append(counter)
        self._own[counter] = entry
        by_dot = self._by_topic.get(topic)
        if by_dot is None:
            by_dot = self._by_topic[topic] = {}
        by_dot[(self.replica, counter)] = entry
        return Diff(joins=(Presence(topic, key, owner, stored),))

    def untrack(self, owner: str, topic: str, key: str) -> Diff:
        """OP2: remove the entry and consume one removal dot; nothing if it is not tracked."""
        counter = self._by_handle.pop((topic, owner, key), None)
        if counter is None:
            return EMPTY_DIFF
        counters = self._by_owner[owner]
        if len(counters) == 1:
            del self._by_owner[owner]
        else:
            counters.remove(counter)
        entry = self._remove_own(counter)
        self._counter += 1
        return Diff(leaves=(_presence(entry),))

    def update(self, owner: str, topic: str, key: str, meta: Meta) -> Diff:
        """OP3: replace the entry by one with a new dot and exactly the caller's meta plus
        ``phx_ref`` and ``phx_ref_prev``; one diff with the join and the leave. Raises NotTracked.
        Two dots: a removal dot, so a peer that misses this delta keeps a gap (T15), then the new
        entry's."""
        handle = (topic, owner, key)
        old_counter = self._by_handle.get(handle)
        if old_counter is None:
            raise NotTracked(topic, owner, key)
        old = self._remove_own(old_counter)
        counter = self._counter = self._counter + 2
        stored = dict(meta)
        stored["phx_ref"] = self._ref_prefix + str(counter)
        stored["phx_ref_prev"] = self._ref_prefix + str(old_counter)
        entry = Entry(self.replica, counter, topic, owner, key, stored)
        self._by_handle[handle] = counter
        counters = self._by_owner[owner]
        counters[counters.index(old_counter)] = counter
        self._own[counter] = entry
        self._index(entry)
        return Diff(joins=(Presence(topic, key, owner, stored),), leaves=(_presence(old),))

    def untrack_owner(self, owner: str) -> Diff:
        """OP4: remove every local entry of the owner; one removal dot if anything was removed."""
        counters = self._by_owner.pop(owner, None)
        if counters is None:
            return EMPTY_DIFF
        leaves = []
        for counter in counters:
            entry = self._remove_own(counter)
            del self._by_handle[(entry.topic, owner, entry.key)]
            leaves.append(_presence(entry))
        self._counter += 1
        return Diff(leaves=tuple(leaves))

    def _remove_own(self, counter: int) -> Entry:
        """Drop an own entry from storage and the topic index; its dot joins the delta (OP2-OP4).
        The caller keeps the handle and owner indexes right."""
        entry = self._own.pop(counter)
        self._unindex(entry)
        if counter <= self._delta_start:
            self._delta_own_removed.add(counter)
        return entry

    def _index(self, entry: Entry) -> None:
        by_dot = self._by_topic.get(entry.topic)
        if by_dot is None:
            by_dot = self._by_topic[entry.topic] = {}
        by_dot[(entry.replica, entry.counter)] = entry

    def _unindex(self, entry: Entry) -> None:
        by_dot = self._by_topic[entry.topic]
        del by_dot[(entry.replica, entry.counter)]
        if not by_dot:
            del self._by_topic[entry.topic]

    # --- deltas and full states (section 4) ----------------------------------------------------

    def take_delta(self) -> Payload | None:
        """DL1: the entries and dots touched since the last take, or None if there are none."""
        start, counter = self._delta_start, self._counter
        if start == counter and not self._delta_own_removed and not self._delta_peer_removed:
            return None
        fresh: list[Entry] = []
        if start < counter:
            for entry in reversed(self._own.values()):
                if entry.counter <= start:
                    break
                fresh.append(entry)
            fresh.reverse()
        context: dict[ReplicaId, DotRanges] = {}
        own_ranges = _to_ranges(self._delta_own_removed)
        if start < counter:
            # Removed dots are all <= start, so the window extends the last range when adjacent.
            if own_ranges and own_ranges[-1][1] == start:
                own_ranges[-1] = (own_ranges[-1][0], counter)
            else:
                own_ranges.append((start + 1, counter))
        if own_ranges:
            context[self.replica] = tuple(own_ranges)
        for peer, removed in self._delta_peer_removed.items():
            context[peer] = tuple(_to_ranges(removed))
        self._delta_start = counter
        self._delta_own_removed = set()
        self._delta_peer_removed = {}
        return Payload(tuple(fresh), context)

    def full_state(self, requester: ReplicaId | None) -> Payload:
        """DL3: every stored entry and the whole context, minus the requester's own (G3)."""
        groups: builtins.list[Iterable[Entry]] = []
        context: dict[ReplicaId, DotRanges] = {}
        if self.replica != requester:
            groups.append(self._own.values())
            if self._counter:
                context[self.replica] = ((1, self._counter),)
        for peer, stored in self._peer_entries.items():
            if peer == requester:
                continue
            groups.append(stored.values())
            ranges = self._context_ranges(peer)
            if ranges:
                context[peer] = ranges
        return Payload(tuple(chain.from_iterable(groups)), context)

    def _context_ranges(self, peer: ReplicaId) -> DotRanges:
        contiguous = self._vv[peer]
        ranges = [(1, contiguous)] if contiguous else []
        cloud = self._cloud.get(peer)
        if cloud:
            ranges.extend(cloud)
        return tuple(ranges)

    # --- merge (section 5) ---------------------------------------------------------------------

    def merge(self, payload: Payload) -> Diff:
        """MG1-MG6, DL2: add unseen entries of known peers, remove stored entries the payload has
        seen removed (relaying those removals), then absorb the payload's context. Every payload
        entry's dot counts as part of the payload's context."""
        status = self._status
        leaves = self._observe_removes(payload) if self._peer_entries else []
        joins: builtins.list[Presence] = []
        peer_entries = self._peer_entries
        by_topic = self._by_topic
        vv = self._vv
        cloud = self._cloud
        # Entries usually come grouped by replica: cache that replica's lookups across the loop.
        current: ReplicaId | None = None
        known: ReplicaId | None = None  # current, when it is a known peer
        stored: dict[int, Entry] | None = None
        contiguous = 0
        above: builtins.list[tuple[int, int]] | tuple[()] = ()  # the stored cloud
        fresh: set[int] = set()  # counters added above a gap by this payload
        visible = False
        for entry in payload.entries:
            replica, counter, topic, owner, key, meta = entry
            if replica != current:
                if known is not None:
                    self._set_context(known, contiguous, _to_ranges(fresh))
                current = replica
                stored = peer_entries.get(replica)  # None for self and unknown replicas (MG1)
                known = None if stored is None else replica
                if known is not None:
                    contiguous = vv[replica]
                    above = cloud.get(replica, ())
                    fresh = set()
                    visible = status[replica] is _UP
            if stored is None or counter <= contiguous or counter in fresh:
                continue
            if above and _ranges_hold(above, counter):
                continue
            # MG2: an unseen dot; it becomes seen at once, so a duplicate in the payload is not
            # added twice.
            if counter == contiguous + 1:
                contiguous = counter
            else:
                fresh.add(counter)
            stored[counter] = entry
            by_dot = by_topic.get(topic)
            if by_dot is None:
                by_dot = by_topic[topic] = {}
            by_dot[(replica, counter)] = entry
            if visible:
                joins.append(Presence(topic, key, owner, meta))
        if known is not None:
            self._set_context(known, contiguous, _to_ranges(fresh))
        # MG4: the payload's context of known peers joins the local context (T36).
        for replica, ranges in payload.context.items():
            if replica in peer_entries:
                self._add_ranges(replica, ranges)
        if not joins and not leaves:
            return EMPTY_DIFF
        return Diff(tuple(joins), tuple(leaves))

    def _observe_removes(self, payload: Payload) -> builtins.list[Presence]:
        """MG3 with DL2 and MG5: remove stored peer entries whose dot the payload's context holds
        but its entries do not; relay their dots; return the leaves of up peers."""
        leaves: builtins.list[Presence] = []
        payload_counters: dict[ReplicaId, set[int]] | None = None
        for replica, ranges in payload.context.items():
            stored = self._peer_entries.get(replica)
            if not stored or not ranges:
                continue
            candidates = self._stored_in_ranges(stored, ranges)
            if not candidates:
                continue
            if payload_counters is None:
                payload_counters = {}
                for entry in payload.entries:
                    payload_counters.setdefault(entry.replica, set()).add(entry.counter)
            kept = payload_counters.get(replica, set())
            visible = self._status[replica] is _UP
            relayed = self._delta_peer_removed.get(replica)
            for counter in candidates:
                if counter in kept:
                    continue
                entry = stored.pop(counter)
                self._unindex(entry)
                if relayed is None:
                    relayed = self._delta_peer_removed[replica] = set()
                relayed.add(counter)
                if visible:
                    leaves.append(_presence(entry))
        return leaves

    @staticmethod
    def _stored_in_ranges(stored: dict[int, Entry], ranges: DotRanges) -> builtins.list[int]:
        """The stored counters inside ``ranges``, walking whichever of the two is smaller."""
        span = 0
        for first, last in ranges:
            span += last - first + 1
        if span <= len(stored):
            return [counter for counter in _ranges_counters(ranges) if counter in stored]
        firsts = [first for first, _ in ranges]
        found = []
        for counter in stored:
            index = bisect_right(firsts, counter) - 1
            if index >= 0 and counter <= ranges[index][1]:
                found.append(counter)
        return found

    def _add_ranges(self, replica: ReplicaId, ranges: DotRanges) -> None:
        contiguous = self._vv[replica]
        above: builtins.list[tuple[int, int]] = []
        for first, last in ranges:
            if last <= contiguous:
                continue
            if first <= contiguous + 1:
                contiguous = last
            else:
                above.append((first, last))
        self._set_context(replica, contiguous, above)

    def _set_context(
        self, replica: ReplicaId, contiguous: int, added: builtins.list[tuple[int, int]]
    ) -> None:
        """Store a peer's context, compacted (T30): the version vector absorbs every range that
        now touches it, and the cloud keeps only the ranges above a gap."""
        cloud = self._cloud.get(replica)
        ranges = _union(cloud, added) if cloud and added else cloud or added
        start = 0
        while start < len(ranges) and ranges[start][0] <= contiguous + 1:
            contiguous = max(contiguous, ranges[start][1])
            start += 1
        if start < len(ranges):
            self._cloud[replica] = ranges[start:]
        else:
            self._cloud.pop(replica, None)
        self._vv[replica] = contiguous

    # --- replica lifecycle (section 6) ---------------------------------------------------------

    def replica_up(self, replica: ReplicaId) -> Diff:
        """RL1: an unknown replica becomes known and up with nothing stored; a down one comes
        up and its stored entries join again (T41, T67)."""
        if replica == self.replica:
            return EMPTY_DIFF
        current = self._status.get(replica)
        if current is _UP:
            return EMPTY_DIFF
        self._status[replica] = _UP
        if current is None:
            self._peer_entries[replica] = {}
            self._vv[replica] = 0
            self._note_vsn(replica)
            return EMPTY_DIFF
        joins = tuple(map(_presence, self._peer_entries[replica].values()))
        return Diff(joins=joins) if joins else EMPTY_DIFF

    def replica_down(self, replica: ReplicaId) -> Diff:
        """RL2: an up replica becomes down; its entries stay stored, hidden, and leave (T42)."""
        if self._status.get(replica) is not _UP:
            return EMPTY_DIFF
        self._status[replica] = _DOWN
        leaves = tuple(map(_presence, self._peer_entries[replica].values()))
        return Diff(leaves=leaves) if leaves else EMPTY_DIFF

    def replica_permdown(self, replica: ReplicaId) -> Diff:
        """RL3: forget a known replica entirely (G2); its entries leave only if it was up (G15)."""
        current = self._status.pop(replica, None)
        if current is None:
            return EMPTY_DIFF
        stored = self._peer_entries.pop(replica)
        for entry in stored.values():
            self._unindex(entry)
        del self._vv[replica]
        self._cloud.pop(replica, None)
        self._delta_peer_removed.pop(replica, None)
        if current is _UP and stored:
            return Diff(leaves=tuple(map(_presence, stored.values())))
        return EMPTY_DIFF

    def observe_incarnation(self, replica: ReplicaId) -> tuple[bool, Diff]:
        """RL4: record ``replica``'s vsn and say whether it is to be heard at all (not the local
        node's name, not older than the latest vsn of its name). A known older incarnation of the
        name is permanently down first (T68, G17); the diff holds its leaves. ``replica`` itself
        is not registered: the caller brings it up."""
        name = replica.name
        if name == self.replica.name:
            return False, EMPTY_DIFF
        if self.superseded(replica):
            return False, EMPTY_DIFF
        self._latest_vsn[name] = replica.vsn
        if name in self._departed and self._departed[name] < replica.vsn:
            del self._departed[name]
        older = [peer for peer in self._status if peer.name == name and peer.vsn < replica.vsn]
        leaves: builtins.list[Presence] = []
        for peer in older:
            leaves.extend(self.replica_permdown(peer).leaves)
        return True, Diff(leaves=tuple(leaves)) if leaves else EMPTY_DIFF

    def retire_incarnation(self, replica: ReplicaId) -> Diff:
        """RL5: an incarnation that announced its departure is superseded from now on (so a
        message it sent before the announcement is ignored) and permanently down if known."""
        self._note_vsn(replica)
        self._departed[replica.name] = replica.vsn
        gone = [p for p in self._status if p.name == replica.name and p.vsn <= replica.vsn]
        leaves: builtins.list[Presence] = []
        for peer in gone:  # it and any older incarnation of its name (RL4)
            leaves.extend(self.replica_permdown(peer).leaves)
        return Diff(leaves=tuple(leaves)) if leaves else EMPTY_DIFF

    def superseded(self, replica: ReplicaId) -> bool:
        """RL4, RL5, GP8: whether anything from ``replica`` is to be ignored: the local node's
        name, an incarnation older than the latest seen of its name, or one that departed."""
        if replica.name == self.replica.name:
            return True
        latest = self._latest_vsn.get(replica.name)
        return (latest is not None and replica.vsn < latest) or (
            self._departed.get(replica.name) == replica.vsn
        )

    def _note_vsn(self, replica: ReplicaId) -> None:
        latest = self._latest_vsn.get(replica.name)
        if latest is None or replica.vsn > latest:
            self._latest_vsn[replica.name] = replica.vsn

    # --- queries -------------------------------------------------------------------------------

    def clock(self) -> dict[ReplicaId, int]:
        """ST3: the contiguous counter of the local replica and of every up peer."""
        clock = {self.replica: self._counter}
        vv = self._vv
        for peer, status in self._status.items():
            if status is _UP:
                clock[peer] = vv[peer]
        return clock

    def _visible(self, entries: Iterable[Entry]) -> Iterable[Entry]:
        """ST4: entries of the local replica and of up peers (stored entries are all known)."""
        down = {peer for peer, status in self._status.items() if status is _DOWN}
        if not down:
            return entries
        return (entry for entry in entries if entry.replica not in down)

    def list(self, topic: str) -> builtins.list[Presence]:
        """ST4: the visible presences of a topic, sorted by (key, owner, phx_ref) (ID5)."""
        by_dot = self._by_topic.get(topic)
        if not by_dot:
            return []
        return [_presence(e) for e in sorted(self._visible(by_dot.values()), key=_observation_key)]

    def topics(self) -> builtins.list[str]:
        """ST4: the topics with at least one visible presence, sorted."""
        down = {peer for peer, status in self._status.items() if status is _DOWN}
        return sorted(
            topic
            for topic, by_dot in self._by_topic.items()
            if not down or any(entry.replica not in down for entry in by_dot.values())
        )

    def get_by_key(self, topic: str, key: str) -> builtins.list[Presence]:
        """ST4: the visible presences of one key of a topic, sorted as ``list``."""
        return [presence for presence in self.list(topic) if presence.key == key]

    def observe(self) -> builtins.list[Presence]:
        """ID5: every visible presence, sorted by (topic, key, owner, phx_ref)."""
        every = chain(self._own.values(), *(s.values() for s in self._peer_entries.values()))
        return [_presence(e) for e in sorted(self._visible(every), key=_observation_key)]

    def status(self, replica: ReplicaId) -> Status | None:
        """A peer's status, or None when it is not known (RL1-RL3)."""
        return self._status.get(replica)

    def peers(self) -> dict[ReplicaId, Status]:
        """Every known peer and its status."""
        return dict(self._status)

    def latest_vsn(self, name: str) -> int | None:
        """RL4: the largest vsn seen for a node name (the local one included), or None."""
        return self._latest_vsn.get(name)

    def size(self) -> int:
        """The number of stored entries, visible or not."""
        return len(self._own) + sum(map(len, self._peer_entries.values()))

    def has_context_dot(self, replica: ReplicaId, counter: int) -> bool:
        """Whether the dot is in the context, exactly as a set of dots would answer (ST1)."""
        if counter < 1:
            return False
        if replica == self.replica:
            return counter <= self._counter
        contiguous = self._vv.get(replica)
        if contiguous is None:
            return False
        return counter <= contiguous or _ranges_hold(self._cloud.get(replica, ()), counter)

    def __repr__(self) -> str:
        return f"State({self.replica!r}, entries={self.size()}, clock={self.clock()!r})"
