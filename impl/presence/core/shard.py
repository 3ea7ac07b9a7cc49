"""The sans-IO gossip protocol of one shard (spec sections 7 and 8).

A ``Shard`` wraps the ``State`` of one replica. The runtime feeds it local commands, the messages
it receives and ticks, always with the current monotonic time in milliseconds; it returns what to
send, the diff to report and the peer status changes. It reads no clock and does no I/O, so a test
can drive several shards by hand and replay any history exactly.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass

from presence.core.config import Config
from presence.core.state import State
from presence.core.types import (
    EMPTY_DIFF,
    Clock,
    Diff,
    GracefulPermdown,
    Heartbeat,
    Message,
    Meta,
    Output,
    Presence,
    ReplicaEvent,
    ReplicaEventKind,
    ReplicaId,
    Send,
    Status,
    TransferAck,
    TransferRequest,
)

_NOTHING = Output()


@dataclass(slots=True)
class _Peer:
    """A registered peer node: its current incarnation and when it was last heard (FD1, FD2)."""

    replica: ReplicaId
    last_heard: int


def _combine(diffs: Iterable[Diff]) -> Diff:
    """DF1: one diff for the sub-steps of a step, taken in order: a presence that joined in one
    and left in a later one (or the reverse) did not change the visible set: it is in neither."""
    parts = [diff for diff in diffs if diff]
    if not parts:
        return EMPTY_DIFF
    if len(parts) == 1:
        return parts[0]
    joins: dict[tuple[str, str, str, object], Presence] = {}
    leaves: dict[tuple[str, str, str, object], Presence] = {}
    for diff in parts:
        for presence in diff.joins:
            identity = (presence.topic, presence.key, presence.owner, presence.meta.get("phx_ref"))
            if leaves.pop(identity, None) is None:
                joins[identity] = presence
        for presence in diff.leaves:
            identity = (presence.topic, presence.key, presence.owner, presence.meta.get("phx_ref"))
            if joins.pop(identity, None) is None:
                leaves[identity] = presence
    return Diff(tuple(joins.values()), tuple(leaves.values()))


def _dominated(clock: tuple[int, ...], other: tuple[int, ...]) -> bool:
    return all(mine <= theirs for mine, theirs in zip(clock, other, strict=True))


class Shard:
    """One replica's gossip protocol: heartbeats (GP2, GP3), anti-entropy by transfer (GP4-GP6),
    graceful shutdown (GP7), failure detection (FD1-FD3) and incarnations (RL4)."""

    def __init__(self, replica: ReplicaId, config: Config) -> None:
        self.replica = replica
        self.config = config
        self.state = State(replica)
        self._peers: dict[str, _Peer] = {}
        # GP2: the first tick always broadcasts, so start one silent tick short of the limit.
        self._silent_ticks = config.max_silent_periods - 1
        self._ticks_to_sample = config.clock_sample_periods
        self._clocks: dict[ReplicaId, Clock] = {}

    def __repr__(self) -> str:
        return f"Shard({self.replica!r}, peers={self.peers()!r})"

    # --- local operations (OP1-OP4) ------------------------------------------------------------

    def track(self, owner: str, topic: str, key: str, meta: Meta) -> Diff:
        """OP1. Raises AlreadyTracked."""
        return self.state.track(owner, topic, key, meta)

    def untrack(self, owner: str, topic: str, key: str) -> Diff:
        """OP2."""
        return self.state.untrack(owner, topic, key)

    def untrack_owner(self, owner: str) -> Diff:
        """OP4."""
        return self.state.untrack_owner(owner)

    def update(self, owner: str, topic: str, key: str, meta: Meta) -> Diff:
        """OP3. Raises NotTracked."""
        return self.state.update(owner, topic, key, meta)

    # --- queries -------------------------------------------------------------------------------

    def list(self, topic: str) -> builtins.list[Presence]:
        """ST4."""
        return self.state.list(topic)

    def get_by_key(self, topic: str, key: str) -> builtins.list[Presence]:
        """ST4."""
        return self.state.get_by_key(topic, key)

    def topics(self) -> builtins.list[str]:
        """ST4: topics with at least one visible presence, sorted."""
        return self.state.topics()

    def observe(self) -> builtins.list[Presence]:
        """ID5: every visible presence, in observation order."""
        return self.state.observe()

    def peers(self) -> dict[ReplicaId, Status]:
        """Every known peer replica and its status."""
        return self.state.peers()

    # --- time ----------------------------------------------------------------------------------

    def tick(self, now: int) -> Output:
        """GP2: broadcast the delta or, when idle long enough, an empty heartbeat; every
        ``clock_sample_periods`` ticks sample clocks (GP4); then detect failures (FD1)."""
        state = self.state
        sends: builtins.list[Send] = []
        delta = state.take_delta()
        if delta is not None:
            sends.append(Send(Heartbeat(self.replica, state.clock(), delta)))
            self._silent_ticks = 0
        else:
            self._silent_ticks += 1
            if self._silent_ticks >= self.config.max_silent_periods:
                sends.append(Send(Heartbeat(self.replica, state.clock())))
                self._silent_ticks = 0
        self._ticks_to_sample -= 1
        if self._ticks_to_sample == 0:
            self._ticks_to_sample = self.config.clock_sample_periods
            sends.extend(self._request_transfers())
        diff, events = self._detect_failures(now)
        return Output(tuple(sends), diff, events)

    def _request_transfers(self) -> builtins.list[Send]:
        """GP4: ask each up peer that is ahead for a transfer, skipping those whose restricted
        clock another ahead peer covers (G16); then forget the remembered clocks."""
        local = self.state.clock()
        up = [replica for replica in local if replica != self.replica]
        ahead: dict[ReplicaId, tuple[int, ...]] = {}
        for sender, clock in self._clocks.items():
            if self.state.status(sender) is not Status.UP:
                continue
            restricted = tuple(clock.get(replica, 0) for replica in up)
            if any(theirs > local[replica] for replica, theirs in zip(up, restricted, strict=True)):
                ahead[sender] = restricted
        self._clocks.clear()
        chosen = [
            sender
            for sender, clock in ahead.items()
            if not any(
                other != sender
                and _dominated(clock, other_clock)
                and (clock != other_clock or other < sender)
                for other, other_clock in ahead.items()
            )
        ]
        request = TransferRequest(self.replica, local)
        return [Send(request, to=sender.name) for sender in sorted(chosen)]

    def _detect_failures(self, now: int) -> tuple[Diff, tuple[ReplicaEvent, ...]]:
        """FD1: strictly longer than ``permdown_period`` silent means permanently down, strictly
        longer than ``down_period`` means down (T69); peers in replica id order."""
        diffs: builtins.list[Diff] = []
        events: builtins.list[ReplicaEvent] = []
        permdown_ms, down_ms = self.config.permdown_period_ms, self.config.down_ms
        for peer in sorted(self._peers.values(), key=lambda peer: peer.replica):
            silence = now - peer.last_heard
            if silence > permdown_ms:
                diffs.append(self._permdown(peer.replica))
                events.append(ReplicaEvent(ReplicaEventKind.PERMDOWN, peer.replica))
            elif silence > down_ms and self.state.status(peer.replica) is Status.UP:
                diffs.append(self.state.replica_down(peer.replica))
                events.append(ReplicaEvent(ReplicaEventKind.DOWN, peer.replica))
        return _combine(diffs), tuple(events)

    def _permdown(self, replica: ReplicaId) -> Diff:
        """RL3, and forget the peer's registration and remembered clock."""
        peer = self._peers.get(replica.name)
        if peer is not None and peer.replica == replica:
            del self._peers[replica.name]
        self._clocks.pop(replica, None)
        return self.state.replica_permdown(replica)

    # --- messages ------------------------------------------------------------------------------

    def receive(self, message: Message, now: int) -> Output:
        """Handle one message from a peer (GP3, GP5-GP7, FD2, RL4). GP8: messages from the local
        node's name or from an incarnation older than the latest seen of its name are ignored."""
        sender = message.sender
        if sender.name == self.replica.name:
            return _NOTHING
        if isinstance(message, Heartbeat):
            return self._receive_heartbeat(message, now)
        if self.state.superseded(sender):
            return _NOTHING
        if isinstance(message, TransferRequest):
            # GP5: answer whoever asks (T58), without the requester's own entries (DL3).
            ack = TransferAck(self.replica, self.state.full_state(sender))
            return Output(sends=(Send(ack, to=sender.name),))
        if isinstance(message, TransferAck):
            # GP6: not a sign of life (T59).
            return Output(diff=self.state.merge(message.payload))
        if isinstance(message, GracefulPermdown):
            # GP7, RL5: the incarnation is retired, and permanently down now if known (T81).
            gone = sorted(
                peer
                for peer in self.state.peers()
                if peer.name == sender.name and peer.vsn <= sender.vsn
            )
            diff = self.state.retire_incarnation(sender)
            for peer in gone:
                self._permdown(peer)
            events = tuple(ReplicaEvent(ReplicaEventKind.PERMDOWN, peer) for peer in gone)
            return Output(diff=diff, events=events)
        return _NOTHING

    def _receive_heartbeat(self, heartbeat: Heartbeat, now: int) -> Output:
        """GP3: liveness first (FD2, RL4), then the delta's merge, then remember the clock."""
        sender = heartbeat.sender
        state = self.state
        diffs: builtins.list[Diff] = []
        events: builtins.list[ReplicaEvent] = []
        peer = self._peers.get(sender.name)
        if peer is not None and peer.replica == sender:
            peer.last_heard = now
            if state.status(sender) is Status.DOWN:
                diffs.append(state.replica_up(sender))  # back from a partition: rejoin (T67)
                events.append(ReplicaEvent(ReplicaEventKind.UP, sender))
        else:
            accepted, replaced = state.observe_incarnation(sender)
            if not accepted:
                return _NOTHING
            if peer is not None:
                # RL4 already forgot the older incarnation in the state (T68).
                self._clocks.pop(peer.replica, None)
                events.append(ReplicaEvent(ReplicaEventKind.PERMDOWN, peer.replica))
            diffs.append(replaced)
            # Unknown, or permanently down earlier and heard again: new, nothing stored (FD3).
            self._peers[sender.name] = _Peer(sender, now)
            diffs.append(state.replica_up(sender))
            events.append(ReplicaEvent(ReplicaEventKind.UP, sender))
        if heartbeat.delta is not None:
            diffs.append(state.merge(heartbeat.delta))
        self._clocks[sender] = heartbeat.clock
        return Output(diff=_combine(diffs), events=tuple(events))

    def shutdown(self) -> Output:
        """GP7: tell every peer to forget this replica now rather than after ``permdown_period``."""
        return Output(sends=(Send(GracefulPermdown(self.replica)),))
