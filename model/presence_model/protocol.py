"""The gossip protocol of one node (one shard), as plain pure functions over immutable values.

A node is a replica state plus what the protocol needs around it: when each peer was last heard,
the silent-tick and sampling counters, and the clocks remembered since the last sample. Time is an
integer of milliseconds passed in by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from presence_model import state as s
from presence_model.state import Diff, Payload, Replica, ReplicaId

Clock = tuple[tuple[ReplicaId, int], ...]
"""A clock as sorted (replica, counter) pairs, so that nodes stay hashable."""


class Config(NamedTuple):
    """Section 8: timing options in milliseconds (validated by the implementation, not here)."""

    broadcast_period: int = 1500
    max_silent_periods: int = 10
    down_period: int = 30_000
    permdown_period: int = 1_200_000
    clock_sample_periods: int = 2


class Heartbeat(NamedTuple):
    """GP1."""

    sender: ReplicaId
    clock: Clock
    delta: Payload | None


class TransferReq(NamedTuple):
    """GP1."""

    sender: ReplicaId
    clock: Clock


class TransferAck(NamedTuple):
    """GP1."""

    sender: ReplicaId
    payload: Payload


class GracefulPermdown(NamedTuple):
    """GP1."""

    sender: ReplicaId


Message = Heartbeat | TransferReq | TransferAck | GracefulPermdown


class Send(NamedTuple):
    """A message to one node by name, or to every peer when ``to`` is None."""

    message: Message
    to: str | None


class Event(NamedTuple):
    """A peer's status change: ``kind`` is "up", "down" or "permdown"."""

    kind: str
    replica: ReplicaId


class Output(NamedTuple):
    sends: tuple[Send, ...] = ()
    diff: Diff = Diff()
    events: tuple[Event, ...] = ()


@dataclass(frozen=True)
class Node:
    """GP2 FD1: a replica plus the protocol's bookkeeping."""

    replica: Replica
    config: Config
    last_heard: tuple[tuple[ReplicaId, int], ...] = ()
    silent_ticks: int = 0
    sample_countdown: int = 0
    clocks_heard: tuple[tuple[ReplicaId, Clock], ...] = ()

    @property
    def me(self) -> ReplicaId:
        return self.replica.me


def new_node(me: ReplicaId, config: Config) -> Node:
    """GP2: the silent counter starts full, so that the first tick always broadcasts."""
    return Node(
        replica=s.new_replica(me),
        config=config,
        silent_ticks=config.max_silent_periods - 1,
        sample_countdown=config.clock_sample_periods,
    )


def _as_clock(counters: dict[ReplicaId, int]) -> Clock:
    return tuple(sorted(counters.items()))


def net_diff(diffs: list[Diff]) -> Diff:
    """DF1: a step reports the net change of the visible set over several sub-steps."""
    visible: dict[s.Presence, int] = {}
    for diff in diffs:
        for presence in diff.leaves:
            visible[presence] = visible.get(presence, 0) - 1
        for presence in diff.joins:
            visible[presence] = visible.get(presence, 0) + 1
    joins = [p for p, change in visible.items() if change > 0]
    leaves = [p for p, change in visible.items() if change < 0]
    order = s.observation_order
    return Diff(tuple(sorted(joins, key=order)), tuple(sorted(leaves, key=order)))


# --- local operations: the state's, nothing more -------------------------------------------------


def local(node: Node, operation: Any, *args: Any) -> tuple[Node, Diff]:
    """OP1 OP2 OP3 OP4: apply a local operation of the state module to the node's replica."""
    replica, diff = operation(node.replica, *args)
    return replace(node, replica=replica), diff


# --- ticks ---------------------------------------------------------------------------------------


def tick(node: Node, now: int) -> tuple[Node, Output]:
    """GP2 GP4 FD1: broadcast, then sample every clock_sample_periods ticks, then detect
    failures."""
    node, sends = _broadcast(node)
    node, requests = _sample(node)
    node, diff, events = _detect_failures(node, now)
    return node, Output(sends + requests, diff, events)


def _broadcast(node: Node) -> tuple[Node, tuple[Send, ...]]:
    """GP2 (1): a delta heartbeat, or an empty one after max_silent_periods silent ticks."""
    replica, delta = s.take_delta(node.replica)
    node = replace(node, replica=replica)
    if delta is None:
        silent = node.silent_ticks + 1
        if silent < node.config.max_silent_periods:
            return replace(node, silent_ticks=silent), ()
    heartbeat = Heartbeat(node.me, _as_clock(s.clock(node.replica)), delta)
    return replace(node, silent_ticks=0), (Send(heartbeat, None),)


def _sample(node: Node) -> tuple[Node, tuple[Send, ...]]:
    """GP4: ask the peers that know more than we do, but not two when one covers the other."""
    if node.sample_countdown > 1:
        return replace(node, sample_countdown=node.sample_countdown - 1), ()
    node = replace(node, sample_countdown=node.config.clock_sample_periods)
    ups = {r for r, status in node.replica.status if status == s.UP}
    mine = s.clock(node.replica)

    def restricted(clock: dict[ReplicaId, int]) -> dict[ReplicaId, int]:
        return {r: clock.get(r, 0) for r in ups}

    ahead = {
        peer: restricted(dict(clock))
        for peer, clock in node.clocks_heard
        if peer in ups and any(n > mine.get(r, 0) for r, n in restricted(dict(clock)).items())
    }

    def covered(peer: ReplicaId) -> bool:
        return any(
            other != peer
            and all(ahead[peer][r] <= ahead[other][r] for r in ups)
            and (ahead[peer] != ahead[other] or other < peer)
            for other in ahead
        )

    request = TransferReq(node.me, _as_clock(mine))
    sends = tuple(Send(request, peer.name) for peer in sorted(ahead) if not covered(peer))
    return replace(node, clocks_heard=()), sends


def _detect_failures(node: Node, now: int) -> tuple[Node, Diff, tuple[Event, ...]]:
    """FD1: permanently down after permdown_period of silence, down after down_period."""
    diffs: list[Diff] = []
    events: list[Event] = []
    for peer, last in node.last_heard:
        silence = now - last
        if silence > node.config.permdown_period:
            node, diff = _permdown(node, peer)
            diffs.append(diff)
            events.append(Event("permdown", peer))
        elif silence > node.config.down_period and node.replica.status_of(peer) == s.UP:
            replica, diff = s.replica_down(node.replica, peer)
            node = replace(node, replica=replica)
            diffs.append(diff)
            events.append(Event("down", peer))
    return node, net_diff(diffs), tuple(events)


def _permdown(node: Node, peer: ReplicaId) -> tuple[Node, Diff]:
    replica, diff = s.replica_permdown(node.replica, peer)
    return (
        replace(
            node,
            replica=replica,
            last_heard=tuple((r, t) for r, t in node.last_heard if r != peer),
            clocks_heard=tuple((r, c) for r, c in node.clocks_heard if r != peer),
        ),
        diff,
    )


# --- messages ------------------------------------------------------------------------------------


def _superseded(node: Node, sender: ReplicaId) -> bool:
    """RL4 RL5: the local replica's own name, an older incarnation than one already seen, or
    one that announced its departure."""
    latest = dict(node.replica.latest_vsn).get(sender.name)
    return (
        sender.name == node.me.name
        or (latest is not None and sender.vsn < latest)
        or sender in node.replica.departed
    )


def receive(node: Node, message: Message, now: int) -> tuple[Node, Output]:
    """GP3 GP5 GP6 GP7 GP8 FD2 FD3 RL4 RL5: handle one message from a peer."""
    if _superseded(node, message.sender):
        return node, Output()
    if isinstance(message, Heartbeat):
        return _heartbeat(node, message, now)
    if isinstance(message, TransferReq):
        payload = s.full_state(node.replica, message.sender)
        return node, Output(sends=(Send(TransferAck(node.me, payload), message.sender.name),))
    if isinstance(message, TransferAck):
        replica, diff = s.merge(node.replica, message.payload)
        return replace(node, replica=replica), Output(diff=diff)
    sender = message.sender
    gone = [r for r, _ in node.replica.status if r.name == sender.name and r.vsn <= sender.vsn]
    replica, diff = s.retire_incarnation(node.replica, sender)
    node = replace(node, replica=replica)
    for replica_id in gone:
        node, _ = _permdown(node, replica_id)
    return node, Output(diff=diff, events=tuple(Event("permdown", r) for r in gone))


def _heartbeat(node: Node, message: Heartbeat, now: int) -> tuple[Node, Output]:
    """GP3 FD2 FD3: liveness first, then the delta, then remember the sender's clock."""
    sender = message.sender
    older = [r for r, _ in node.replica.status if r.name == sender.name and r.vsn < sender.vsn]
    replica, _, retired = s.observe_incarnation(node.replica, sender)  # RL4: retire older ones
    events = [Event("permdown", r) for r in older]
    was = replica.status_of(sender)
    replica, joined = s.replica_up(replica, sender)  # FD3: unknown or down -> up
    if was != s.UP:
        events.append(Event("up", sender))
    diffs = [retired, joined]
    if message.delta is not None:
        replica, merged = s.merge(replica, message.delta)
        diffs.append(merged)
    last_heard = {r: t for r, t in node.last_heard if r.name != sender.name}
    last_heard[sender] = now
    clocks = {r: c for r, c in node.clocks_heard if r.name != sender.name}
    clocks[sender] = message.clock
    node = replace(
        node,
        replica=replica,
        last_heard=tuple(sorted(last_heard.items())),
        clocks_heard=tuple(sorted(clocks.items())),
    )
    return node, Output(diff=net_diff(diffs), events=tuple(events))


def observe(node: Node) -> list[s.Presence]:
    """ID5 ST4: the node's visible presences."""
    return s.observe(node.replica)


def shutdown(node: Node) -> Output:
    """GP7: announce a permanent departure to every peer."""
    return Output(sends=(Send(GracefulPermdown(node.me), None),))
