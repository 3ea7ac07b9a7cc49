"""The wire format: versioned JSON frames, validated with pydantic at the boundary.

The core's messages are plain frozen dataclasses that trust their callers; everything a peer sends
is untrusted, so this module is where it is checked. A frame that does not parse, has the wrong
shape, breaks a bound or is internally inconsistent (an entry whose dot is not in its payload's
context) raises :class:`CodecError` and never reaches a shard.

A frame is one JSON object::

    {"v": 1, "shard": 0, "msg": {"type": "heartbeat", ...}}

``shard`` is the index of the shard the message belongs to, and is absent for the transport's
``hello``. Replicas are ``[name, vsn]``, clocks are lists of ``[name, vsn, counter]``, and a payload
groups its entries under the context of the replica that created them::

    {"context": [{"replica": ["n1", 7], "ranges": [[1, 4], [6, 6]],
                  "entries": [{"counter": 3, "topic": "t", "owner": "o", "key": "k",
                               "meta": {...}}]}]}

Grouping states the "every entry's dot is in the payload's context" rule structurally, and keeps
replica names out of every entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticSerializationError

from presence.core.types import (
    Clock,
    DotRanges,
    Entry,
    GracefulPermdown,
    Heartbeat,
    Message,
    Payload,
    ReplicaId,
    TransferAck,
    TransferRequest,
)

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_INT = 2**63 - 1
"""Counters and vsns stay within a signed 64-bit integer, so every language can read them."""

REF_ALLOWANCE_BYTES = 1024
"""Room the codec leaves, above a caller's meta limit, for the ``phx_ref``/``phx_ref_prev`` the
core adds (two refs of a name of at most 255 characters and two 64-bit integers each)."""

MAX_META_DEPTH = 32
"""How deeply a meta may nest: the meta object counts as level 1, each object or array inside it
one more. Part of the protocol, not a per-node limit: what one node tracks every peer must decode.
(The JSON parser refuses a frame nested about 200 deep, the serialiser about 250; a meta sits
about 8 levels down in a frame, so 32 leaves a wide margin.)"""


class CodecError(ValueError):
    """A frame that cannot be encoded or decoded: malformed, of a wrong shape, or out of bounds."""


class OversizedFrame(CodecError):
    """An encoded frame above the frame limit; ``size`` tells by how much, for splitting."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"encoded frame of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a peer may send (and on what a local caller may track)."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_name_chars: int = 255
    """Node and cluster names."""
    max_string_chars: int = 1024
    """Topics, owners and keys."""
    max_meta_bytes: int = 64 * 1024
    """A caller's meta, encoded as compact UTF-8 JSON."""

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_name_chars", "max_string_chars", "max_meta_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = Limits()


# --- frames as the runtime sees them ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame on every connection, in both directions.

    ``listen`` is the address the sender accepts peers on, so that a node dialed by a peer it
    was not configured with can dial it back (an unspecified host such as ``0.0.0.0`` means: the
    address this connection comes from).
    """

    node: str
    cluster: str
    pool_size: int
    protocol: int = PROTOCOL_VERSION
    listen: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class ShardMessage:
    """A core message addressed to the shard with index ``shard`` of the receiving node."""

    shard: int
    message: Message


Frame = Hello | ShardMessage


# --- the wire schema ----------------------------------------------------------------------------

Counter = Annotated[int, Field(ge=1, le=MAX_INT)]
ClockValue = Annotated[int, Field(ge=0, le=MAX_INT)]
Vsn = Annotated[int, Field(ge=0, le=MAX_INT)]


def _limits(info: ValidationInfo) -> Limits:
    context = info.context
    if isinstance(context, dict):
        limits = context.get("limits")
        if isinstance(limits, Limits):
            return limits
    return DEFAULT_LIMITS


def _check_text(value: str, limit: int, what: str) -> str:
    if len(value) > limit:
        raise ValueError(f"{what} longer than {limit} characters")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON escapes can smuggle in
        raise ValueError(f"{what} is not valid Unicode text") from None
    return value


def _check_name(value: str, info: ValidationInfo, what: str) -> str:
    if not value:
        raise ValueError(f"{what} must not be empty")
    return _check_text(value, _limits(info).max_name_chars, what)


def _check_string(value: str, info: ValidationInfo) -> str:
    return _check_text(value, _limits(info).max_string_chars, "string")


def meta_depth_exceeds(value: object, limit: int = MAX_META_DEPTH) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels deep (``value``
    itself, if it is one, being level 1). Iterative, so no input can exhaust the interpreter's
    recursion limit, and it stops at the first path that is too deep (a cycle is one)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Iterable[object] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def meta_size(meta: Mapping[str, Any]) -> int:
    """Bytes of ``meta`` as compact UTF-8 JSON; raises ``ValueError`` if it is not JSON."""
    return len(
        json.dumps(meta, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    )


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


WireReplicaId = tuple[str, Vsn]
WireClockEntry = tuple[str, Vsn, ClockValue]


def _check_replica(replica: tuple[str, int], info: ValidationInfo) -> tuple[str, int]:
    _check_name(replica[0], info, "replica name")
    return replica


class WireEntry(_Wire):
    counter: Counter
    topic: str
    owner: str
    key: str
    meta: dict[str, Any]

    @field_validator("topic", "owner", "key")
    @classmethod
    def _bounded(cls, value: str, info: ValidationInfo) -> str:
        return _check_string(value, info)

    @field_validator("meta")
    @classmethod
    def _meta_bounded(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if meta_depth_exceeds(value):
            raise ValueError(f"meta nests deeper than {MAX_META_DEPTH} levels")
        limit = _limits(info).max_meta_bytes + REF_ALLOWANCE_BYTES
        try:
            size = meta_size(value)
        except ValueError as exc:  # NaN or Infinity: not JSON
            raise ValueError(f"meta is not plain JSON: {exc}") from None
        if size > limit:
            raise ValueError(f"meta of {size} bytes exceeds {limit}")
        return value


class WireContext(_Wire):
    """The dots of one replica in a payload, and the entries of the payload it created."""

    replica: WireReplicaId
    ranges: tuple[tuple[Counter, Counter], ...]
    entries: tuple[WireEntry, ...] = ()

    @field_validator("replica")
    @classmethod
    def _replica(cls, value: tuple[str, int], info: ValidationInfo) -> tuple[str, int]:
        return _check_replica(value, info)

    @field_validator("ranges")
    @classmethod
    def _ranges_well_formed(cls, value: DotRanges) -> DotRanges:
        previous_last = 0
        for first, last in value:
            if first > last:
                raise ValueError(f"range [{first}, {last}] has first > last")
            if first <= previous_last:
                raise ValueError("ranges must be sorted and disjoint")
            previous_last = last
        return value

    @model_validator(mode="after")
    def _entries_inside_context(self) -> WireContext:
        seen: set[int] = set()
        for entry in self.entries:
            if entry.counter in seen:
                raise ValueError(f"two entries with the dot counter {entry.counter}")
            seen.add(entry.counter)
            if not _ranges_contain(self.ranges, entry.counter):
                raise ValueError(
                    f"entry with dot counter {entry.counter} is outside the payload's context"
                )
        return self


class WirePayload(_Wire):
    context: tuple[WireContext, ...]

    @model_validator(mode="after")
    def _one_block_per_replica(self) -> WirePayload:
        replicas = [block.replica for block in self.context]
        if len(set(replicas)) != len(replicas):
            raise ValueError("a replica appears twice in the payload's context")
        return self


class _WithSender(_Wire):
    sender: WireReplicaId

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: tuple[str, int], info: ValidationInfo) -> tuple[str, int]:
        return _check_replica(value, info)


class _WithClock(_WithSender):
    clock: tuple[WireClockEntry, ...]

    @field_validator("clock")
    @classmethod
    def _clock(
        cls, value: tuple[tuple[str, int, int], ...], info: ValidationInfo
    ) -> tuple[tuple[str, int, int], ...]:
        replicas = set()
        for name, vsn, _counter in value:
            _check_name(name, info, "replica name")
            replicas.add((name, vsn))
        if len(replicas) != len(value):
            raise ValueError("a replica appears twice in the clock")
        return value


class WireHello(_Wire):
    type: Literal["hello"]
    node: str
    cluster: str
    pool_size: Annotated[int, Field(ge=1, le=65536)]
    protocol: Annotated[int, Field(ge=1, le=MAX_INT)]
    listen: tuple[str, Annotated[int, Field(ge=1, le=65535)]] | None = None

    @field_validator("node", "cluster")
    @classmethod
    def _names(cls, value: str, info: ValidationInfo) -> str:
        return _check_name(value, info, str(info.field_name))

    @field_validator("listen")
    @classmethod
    def _listen(
        cls, value: tuple[str, int] | None, info: ValidationInfo
    ) -> tuple[str, int] | None:
        if value is not None:
            _check_name(value[0], info, "listen host")
        return value


class WireHeartbeat(_WithClock):
    type: Literal["heartbeat"]
    delta: WirePayload | None = None


class WireTransferRequest(_WithClock):
    type: Literal["transfer_req"]


class WireTransferAck(_WithSender):
    type: Literal["transfer_ack"]
    payload: WirePayload


class WireGracefulPermdown(_WithSender):
    type: Literal["graceful_permdown"]


WireMessage = Annotated[
    WireHello | WireHeartbeat | WireTransferRequest | WireTransferAck | WireGracefulPermdown,
    Field(discriminator="type"),
]


class WireEnvelope(_Wire):
    v: int
    shard: Annotated[int, Field(ge=0, le=65535)] | None = None
    msg: WireMessage

    @field_validator("v")
    @classmethod
    def _supported_version(cls, value: int) -> int:
        if value != PROTOCOL_VERSION:
            raise ValueError(
                f"unsupported protocol version {value} (this node speaks {PROTOCOL_VERSION})"
            )
        return value

    @model_validator(mode="after")
    def _shard_iff_core_message(self) -> WireEnvelope:
        if isinstance(self.msg, WireHello):
            if self.shard is not None:
                raise ValueError("a hello frame carries no shard index")
        elif self.shard is None:
            raise ValueError(f"a {self.msg.type} frame needs a shard index")
        return self


def _ranges_contain(ranges: DotRanges, counter: int) -> bool:
    return any(first <= counter <= last for first, last in ranges)


# --- conversions --------------------------------------------------------------------------------


def _payload_to_wire(payload: Payload) -> dict[str, Any]:
    entries_by_replica: dict[ReplicaId, list[dict[str, Any]]] = {}
    for entry in payload.entries:
        entries_by_replica.setdefault(entry.replica, []).append(
            {
                "counter": entry.counter,
                "topic": entry.topic,
                "owner": entry.owner,
                "key": entry.key,
                "meta": dict(entry.meta),
            }
        )
    blocks = []
    for replica, ranges in payload.context.items():
        blocks.append(
            {
                "replica": (replica.name, replica.vsn),
                "ranges": tuple(tuple(r) for r in ranges),
                "entries": tuple(entries_by_replica.pop(replica, ())),
            }
        )
    if entries_by_replica:
        stray = ", ".join(f"{r.name}.{r.vsn}" for r in entries_by_replica)
        raise CodecError(f"payload has entries of replicas missing from its context: {stray}")
    return {"context": tuple(blocks)}


def _clock_to_wire(clock: Clock) -> tuple[tuple[str, int, int], ...]:
    return tuple((replica.name, replica.vsn, counter) for replica, counter in clock.items())


def _message_to_wire(message: Message) -> dict[str, Any]:
    sender = (message.sender.name, message.sender.vsn)
    match message:
        case Heartbeat(clock=clock, delta=delta):
            return {
                "type": "heartbeat",
                "sender": sender,
                "clock": _clock_to_wire(clock),
                "delta": None if delta is None else _payload_to_wire(delta),
            }
        case TransferRequest(clock=clock):
            return {"type": "transfer_req", "sender": sender, "clock": _clock_to_wire(clock)}
        case TransferAck(payload=payload):
            return {"type": "transfer_ack", "sender": sender, "payload": _payload_to_wire(payload)}
        case GracefulPermdown():
            return {"type": "graceful_permdown", "sender": sender}
    raise CodecError(f"not a message: {message!r}")


def _payload_from_wire(wire: WirePayload) -> Payload:
    entries: list[Entry] = []
    context: dict[ReplicaId, DotRanges] = {}
    for block in wire.context:
        replica = ReplicaId(*block.replica)
        context[replica] = block.ranges
        entries.extend(
            Entry(replica, e.counter, e.topic, e.owner, e.key, e.meta) for e in block.entries
        )
    return Payload(entries=tuple(entries), context=context)


def _clock_from_wire(clock: tuple[tuple[str, int, int], ...]) -> dict[ReplicaId, int]:
    return {ReplicaId(name, vsn): counter for name, vsn, counter in clock}


def _frame_from_wire(envelope: WireEnvelope) -> Frame:
    msg = envelope.msg
    if isinstance(msg, WireHello):
        return Hello(node=msg.node, cluster=msg.cluster, pool_size=msg.pool_size,
                     protocol=msg.protocol, listen=msg.listen)
    assert envelope.shard is not None  # guaranteed by WireEnvelope's validator
    sender = ReplicaId(*msg.sender)
    message: Message
    if isinstance(msg, WireHeartbeat):
        delta = None if msg.delta is None else _payload_from_wire(msg.delta)
        message = Heartbeat(sender=sender, clock=_clock_from_wire(msg.clock), delta=delta)
    elif isinstance(msg, WireTransferRequest):
        message = TransferRequest(sender=sender, clock=_clock_from_wire(msg.clock))
    elif isinstance(msg, WireTransferAck):
        message = TransferAck(sender=sender, payload=_payload_from_wire(msg.payload))
    else:
        message = GracefulPermdown(sender=sender)
    return ShardMessage(shard=envelope.shard, message=message)


def _describe(error: ValidationError) -> str:
    problems = []
    for detail in error.errors()[:3]:
        where = ".".join(str(part) for part in detail["loc"])
        problems.append(f"{where}: {detail['msg']}" if where else str(detail["msg"]))
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def encode(frame: Frame, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode a frame, checking it exactly as :func:`decode` will on the other side."""
    if isinstance(frame, Hello):
        raw: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "msg": {"type": "hello", "node": frame.node, "cluster": frame.cluster,
                    "pool_size": frame.pool_size, "protocol": frame.protocol},
        }
        if frame.listen is not None:
            raw["msg"]["listen"] = frame.listen
    elif isinstance(frame, ShardMessage):
        raw = {"v": PROTOCOL_VERSION, "shard": frame.shard, "msg": _message_to_wire(frame.message)}
    else:
        raise CodecError(f"not a frame: {frame!r}")
    try:
        envelope = WireEnvelope.model_validate(raw, context={"limits": limits})
    except ValidationError as exc:
        raise CodecError(f"cannot encode frame: {_describe(exc)}") from None
    try:
        data = envelope.model_dump_json(exclude_none=isinstance(frame, Hello)).encode()
    except PydanticSerializationError as exc:  # validation passed, so a bug: still a CodecError
        raise CodecError(f"cannot encode frame: {exc}") from None
    if len(data) > limits.max_frame_bytes:
        raise OversizedFrame(len(data), limits.max_frame_bytes)
    return data


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Decode and validate one frame; raises :class:`CodecError` on anything malformed."""
    if len(data) > limits.max_frame_bytes:
        raise CodecError(
            f"frame of {len(data)} bytes exceeds the limit of {limits.max_frame_bytes}"
        )
    try:
        envelope = WireEnvelope.model_validate_json(
            data, strict=True, context={"limits": limits}
        )
    except ValidationError as exc:
        raise CodecError(f"invalid frame: {_describe(exc)}") from None
    return _frame_from_wire(envelope)
