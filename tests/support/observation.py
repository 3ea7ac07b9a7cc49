"""The observation format: the one thing the model and the implementation are compared on.

A presence is observed as ``(topic, key, owner, meta)`` with ``meta`` a plain dict holding the
refs (spec ID5). Both sides are converted here; neither side imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import presence_model.protocol as protocol
import presence_model.state as model
from presence.core import types as impl

Observed = tuple[str, str, str, str]
"""(topic, key, owner, canonical JSON of meta): hashable and totally ordered."""


def canonical(meta: Any) -> str:
    return json.dumps(dict(meta), sort_keys=True, separators=(",", ":"))


def observed_model(presences: Iterable[model.Presence]) -> list[Observed]:
    return sorted((p.topic, p.key, p.owner, canonical(json.loads(p.meta))) for p in presences)


def observed_impl(presences: Iterable[impl.Presence]) -> list[Observed]:
    return sorted((p.topic, p.key, p.owner, canonical(p.meta)) for p in presences)


def diff_model(diff: model.Diff) -> tuple[list[Observed], list[Observed]]:
    return observed_model(diff.joins), observed_model(diff.leaves)


def diff_impl(diff: impl.Diff) -> tuple[list[Observed], list[Observed]]:
    return observed_impl(diff.joins), observed_impl(diff.leaves)


# --- messages: compared field by field, payloads as sets of entries and dots --------------------

Canonical = tuple[Any, ...]


def _entries_model(entries: Iterable[model.Entry]) -> list[Canonical]:
    return sorted(
        (*e.dot.replica, e.dot.n, e.topic, e.owner, e.key, canonical(json.loads(e.meta)))
        for e in entries
    )


def _entries_impl(entries: Iterable[impl.Entry]) -> list[Canonical]:
    return sorted(
        (*e.replica, e.counter, e.topic, e.owner, e.key, canonical(e.meta)) for e in entries
    )


def payload_model(payload: model.Payload | None) -> Canonical | None:
    if payload is None:
        return None
    dots = sorted((*d.replica, d.n) for d in payload.context)
    return (_entries_model(payload.entries), dots)


def payload_impl(payload: impl.Payload | None) -> Canonical | None:
    if payload is None:
        return None
    dots = sorted(
        (*replica, n)
        for replica, ranges in payload.context.items()
        for first, last in ranges
        for n in range(first, last + 1)
    )
    return (_entries_impl(payload.entries), dots)


def clock_canonical(clock: Any) -> list[tuple[str, int, int]]:
    return sorted((*replica, n) for replica, n in dict(clock).items())


def message_model(message: Any) -> Canonical:
    kind = type(message).__name__
    sender = tuple(message.sender)
    if isinstance(message, protocol.Heartbeat):
        return ("heartbeat", sender, clock_canonical(message.clock), payload_model(message.delta))
    if isinstance(message, protocol.TransferReq):
        return ("transfer_req", sender, clock_canonical(message.clock))
    if isinstance(message, protocol.TransferAck):
        return ("transfer_ack", sender, payload_model(message.payload))
    assert kind == "GracefulPermdown", kind
    return ("graceful_permdown", sender)


def message_impl(message: impl.Message) -> Canonical:
    sender = tuple(message.sender)
    if isinstance(message, impl.Heartbeat):
        return ("heartbeat", sender, clock_canonical(message.clock), payload_impl(message.delta))
    if isinstance(message, impl.TransferRequest):
        return ("transfer_req", sender, clock_canonical(message.clock))
    if isinstance(message, impl.TransferAck):
        return ("transfer_ack", sender, payload_impl(message.payload))
    return ("graceful_permdown", sender)


def events_model(events: Iterable[Any]) -> list[tuple[str, str, int]]:
    return [(e.kind, *e.replica) for e in events]


def events_impl(events: Iterable[impl.ReplicaEvent]) -> list[tuple[str, str, int]]:
    return [(e.kind.value, *e.replica) for e in events]
