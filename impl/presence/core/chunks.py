"""Splitting a payload into smaller payloads that are each safe to merge on their own.

A full state can outgrow one frame, so a transfer ack may have to travel as several acks (GP5).
Cutting a payload anywhere is not safe: merge removes every stored entry whose dot is in the
payload's context but not among its entries (MG3), so a chunk carrying the whole context with only
some of the entries would make the receiver drop the entries that travel in other chunks.

The rule that makes a chunk safe: pick a set ``S`` of dots and send exactly the entries whose dot
is in ``S`` together with the context restricted to ``S``. Then

* the chunk is a valid payload (every entry's dot is in its context);
* merging it can only remove an entry whose dot is in ``S`` and is in the responder's context but
  not among the responder's entries: one the responder has seen removed, exactly as merging the
  whole payload would; it adds only entries the whole payload adds;
* so merging any subset of the chunks, in any order, is safe: it moves the receiver towards the
  responder's state and never past it;
* for disjoint sets ``S`` the chunks' contexts and entries are disjoint, so the payload is their
  join (the union of contexts and of entries), and merging all of them gives the same state, and
  the same joins and leaves, as merging the payload at once (MG6).

Here each ``S`` is a range of counters of one replica, which keeps both the cutting and the
restriction of a context (kept as ranges) cheap whatever the span of the counters.
"""

from __future__ import annotations

from collections.abc import Iterable

from presence.core.types import DotRanges, Entry, Payload, ReplicaId


def restrict(ranges: DotRanges, first: int, last: int | None) -> DotRanges:
    """The part of sorted disjoint ``ranges`` inside ``[first, last]`` (``None``: no upper end)."""
    kept: list[tuple[int, int]] = []
    for low, high in ranges:
        if high < first or (last is not None and low > last):
            continue
        kept.append((max(low, first), high if last is None else min(high, last)))
    return tuple(kept)


def split_payload(payload: Payload, max_entries: int) -> list[Payload]:
    """Split ``payload`` into payloads of at most ``max_entries`` entries each (at least one).

    Each chunk covers one range of counters of one replica: every entry of that replica with a
    counter in the range, and that replica's context restricted to the range. The ranges of a
    replica are consecutive and together cover every counter, so nothing of the context is lost
    (see the module docstring for why each chunk, any subset and the whole set are safe to merge).
    A replica with context but no entries gives one chunk of context only. Chunks come in the
    order of ``payload.context``, each replica's in ascending counter order.

    Raises ``ValueError`` if ``max_entries < 1`` or an entry's replica has no context in the
    payload (a malformed payload: its dot is not in the context).
    """
    if max_entries < 1:
        raise ValueError(f"max_entries must be at least 1, got {max_entries}")
    by_replica: dict[ReplicaId, list[Entry]] = {}
    for entry in payload.entries:
        by_replica.setdefault(entry.replica, []).append(entry)
    stray = by_replica.keys() - payload.context.keys()
    if stray:
        raise ValueError(f"entries of replicas missing from the context: {sorted(stray)}")
    chunks: list[Payload] = []
    for replica, ranges in payload.context.items():
        entries = sorted(by_replica.get(replica, ()), key=lambda entry: entry.counter)
        if not entries:
            if ranges:
                chunks.append(Payload((), {replica: ranges}))
            continue
        first = 1
        for start in range(0, len(entries), max_entries):
            group = entries[start:start + max_entries]
            # The last chunk reaches to the end of the context, past its last entry.
            last = None if start + max_entries >= len(entries) else group[-1].counter
            chunks.append(Payload(tuple(group), {replica: restrict(ranges, first, last)}))
            if last is not None:
                first = last + 1
    return chunks


def drop_entries(payload: Payload, entries: Iterable[Entry]) -> Payload:
    """``payload`` without ``entries`` and without their dots in its context.

    Still a valid, safe chunk (``S`` minus those dots): a receiver that stores one of the dropped
    entries keeps it, since its dot is no longer in the context. For an entry too large to send.
    """
    dropped = {(entry.replica, entry.counter) for entry in entries}
    context: dict[ReplicaId, DotRanges] = {}
    for replica, ranges in payload.context.items():
        holes = sorted(counter for owner, counter in dropped if owner == replica)
        kept = list(ranges)
        for hole in holes:
            kept = [piece for low, high in kept for piece in _punch(low, high, hole)]
        if kept:
            context[replica] = tuple(kept)
    kept_entries = tuple(e for e in payload.entries if (e.replica, e.counter) not in dropped)
    return Payload(kept_entries, context)


def _punch(low: int, high: int, hole: int) -> list[tuple[int, int]]:
    if not low <= hole <= high:
        return [(low, high)]
    return [piece for piece in ((low, hole - 1), (hole + 1, high)) if piece[0] <= piece[1]]
