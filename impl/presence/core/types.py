"""Values shared by the sans-IO core: identities, presences, diffs, payloads and messages.

All are small immutable values whose ``repr`` is valid Python, so a failing case printed by a test
can be pasted back into one. Validation of untrusted input happens in the codec, not here: these
constructors trust their callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, TypeAlias

Meta: TypeAlias = Mapping[str, Any]


class ReplicaId(NamedTuple):
    """One incarnation of a node (spec ID1). Ordered by (name, vsn)."""

    name: str
    vsn: int


class Entry(NamedTuple):
    """A presence entry (spec ID3): its dot is (replica, counter)."""

    replica: ReplicaId
    counter: int
    topic: str
    owner: str
    key: str
    meta: Meta


class Presence(NamedTuple):
    """What an observer sees of one entry (spec ID5). ``meta`` holds ``phx_ref``."""

    topic: str
    key: str
    owner: str
    meta: Meta


def ref_of(replica: ReplicaId, counter: int) -> str:
    """The opaque ref of a dot (spec ID4)."""
    return f"{replica.name}.{replica.vsn}.{counter}"


@dataclass(frozen=True, slots=True)
class Diff:
    """Presences that became visible (joins) and invisible (leaves) in one step."""

    joins: tuple[Presence, ...] = ()
    leaves: tuple[Presence, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.joins or self.leaves)

    def by_topic(self) -> dict[str, tuple[list[Presence], list[Presence]]]:
        """Group as ``topic -> (joins, leaves)``, the shape Phoenix reports (T26, T27)."""
        grouped: dict[str, tuple[list[Presence], list[Presence]]] = {}
        for presence in self.joins:
            grouped.setdefault(presence.topic, ([], []))[0].append(presence)
        for presence in self.leaves:
            grouped.setdefault(presence.topic, ([], []))[1].append(presence)
        return grouped


EMPTY_DIFF = Diff()


class Status(StrEnum):
    """A peer replica's status as seen locally (spec RL1-RL3)."""

    UP = "up"
    DOWN = "down"


DotRanges: TypeAlias = tuple[tuple[int, int], ...]
"""A set of counters of one replica as sorted, disjoint, inclusive ``(first, last)`` ranges."""


@dataclass(frozen=True, slots=True)
class Payload:
    """A delta or a full state (spec section 4): entries plus the dots they are judged against.

    Every entry's dot is in ``context`` (receivers also treat it so).
    """

    entries: tuple[Entry, ...] = ()
    context: Mapping[ReplicaId, DotRanges] = field(default_factory=dict)


# --- messages between replicas of one shard (spec GP1) ------------------------------------------

Clock: TypeAlias = Mapping[ReplicaId, int]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    sender: ReplicaId
    clock: Clock
    delta: Payload | None = None


@dataclass(frozen=True, slots=True)
class TransferRequest:
    sender: ReplicaId
    clock: Clock


@dataclass(frozen=True, slots=True)
class TransferAck:
    sender: ReplicaId
    payload: Payload


@dataclass(frozen=True, slots=True)
class GracefulPermdown:
    sender: ReplicaId


Message: TypeAlias = Heartbeat | TransferRequest | TransferAck | GracefulPermdown


@dataclass(frozen=True, slots=True)
class Send:
    """A message to deliver: to the node named ``to``, or to every peer when ``to`` is None."""

    message: Message
    to: str | None = None


class ReplicaEventKind(StrEnum):
    UP = "up"
    DOWN = "down"
    PERMDOWN = "permdown"


@dataclass(frozen=True, slots=True)
class ReplicaEvent:
    """A status change of a peer, reported for logs and tests (T74)."""

    kind: ReplicaEventKind
    replica: ReplicaId


@dataclass(frozen=True, slots=True)
class Output:
    """What the core asks its runtime to do after an event."""

    sends: tuple[Send, ...] = ()
    diff: Diff = EMPTY_DIFF
    events: tuple[ReplicaEvent, ...] = ()


# --- errors a local caller can get (their misuse, never a peer's) -------------------------------


class PresenceError(Exception):
    """Base class of errors raised to local callers."""


class AlreadyTracked(PresenceError):
    def __init__(self, topic: str, owner: str, key: str) -> None:
        super().__init__(f"already tracked: topic={topic!r} owner={owner!r} key={key!r}")
        self.topic, self.owner, self.key = topic, owner, key


class NotTracked(PresenceError):
    def __init__(self, topic: str, owner: str, key: str) -> None:
        super().__init__(f"not tracked: topic={topic!r} owner={owner!r} key={key!r}")
        self.topic, self.owner, self.key = topic, owner, key


class ConfigError(PresenceError, ValueError):
    """An invalid configuration value (spec section 8, G5)."""
