"""Unit tests of ``presence.core.shard.Shard``: the gossip protocol (GP1-GP7), failure detection
(FD1-FD3) and incarnations (RL4), driven by hand with explicit times."""

from __future__ import annotations

from presence.core.config import Config
from presence.core.shard import Shard
from presence.core.types import (
    Clock,
    Diff,
    GracefulPermdown,
    Heartbeat,
    Message,
    Output,
    Payload,
    Presence,
    ReplicaEvent,
    ReplicaEventKind,
    ReplicaId,
    Send,
    Status,
    TransferAck,
    TransferRequest,
)

A = ReplicaId("a", 1)
B = ReplicaId("b", 1)
C = ReplicaId("c", 1)
D = ReplicaId("d", 1)

# down after 700 ms of silence, permanently down after 2000 ms; idle heartbeat every 3 ticks.
CONFIG = Config(
    broadcast_period_ms=100,
    max_silent_periods=3,
    down_period_ms=700,
    permdown_period_ms=2000,
    clock_sample_periods=2,
)

UP, DOWN, PERMDOWN = ReplicaEventKind.UP, ReplicaEventKind.DOWN, ReplicaEventKind.PERMDOWN


def shard(replica: ReplicaId = A, config: Config = CONFIG) -> Shard:
    return Shard(replica, config)


def heartbeat(
    sender: ReplicaId, clock: Clock | None = None, delta: Payload | None = None
) -> Heartbeat:
    return Heartbeat(sender, {sender: 0} if clock is None else clock, delta)


def refs(presences: tuple[Presence, ...] | list[Presence]) -> list[str]:
    return sorted(p.meta["phx_ref"] for p in presences)


def heartbeats(output: Output) -> list[Heartbeat]:
    return [send.message for send in output.sends if isinstance(send.message, Heartbeat)]


def requests(output: Output) -> list[str | None]:
    return [send.to for send in output.sends if isinstance(send.message, TransferRequest)]


def with_entries_of(peer: ReplicaId, *keys: str, now: int = 0) -> tuple[Shard, Shard]:
    """A shard ``a`` that heard ``peer`` at ``now`` and holds its entries, one per key."""
    local, remote = shard(A), shard(peer)
    for key in keys:
        remote.track("o", "t", key, {})
    local.receive(heartbeat(peer, remote.state.clock(), remote.state.take_delta()), now)
    assert len(local.list("t")) == len(keys)
    return local, remote


class Network:
    """Delivers every send, in order, to the shards it is addressed to; ``cut`` names nodes
    whose incoming and outgoing messages are dropped."""

    def __init__(self, *shards: Shard) -> None:
        self.shards = {s.replica.name: s for s in shards}
        self.queue: list[tuple[str, Message]] = []
        self.cut: set[str] = set()
        self.events: list[tuple[str, ReplicaEvent]] = []

    def post(self, origin: str, output: Output) -> None:
        self.events.extend((origin, event) for event in output.events)
        if origin in self.cut:
            return
        for send in output.sends:
            targets = [send.to] if send.to is not None else [n for n in self.shards if n != origin]
            self.queue.extend((target, send.message) for target in targets if target)

    def deliver(self, now: int) -> None:
        while self.queue:
            target, message = self.queue.pop(0)
            if target in self.shards and target not in self.cut:
                self.post(target, self.shards[target].receive(message, now))

    def run(self, start: int, ticks: int) -> int:
        now = start
        for _ in range(ticks):
            now += CONFIG.broadcast_period_ms
            for name, node in self.shards.items():
                self.post(name, node.tick(now))
            self.deliver(now)
        return now

    def views(self) -> dict[str, list[Presence]]:
        return {name: node.state.observe() for name, node in self.shards.items()}


# --- local operations ---------------------------------------------------------------------------


def test_op_local_operations_and_queries_go_through_the_shard() -> None:
    node = shard()
    assert refs(node.track("o", "t", "k", {}).joins) == ["a.1.1"]
    assert refs(node.update("o", "t", "k", {"v": 2}).joins) == ["a.1.3"]  # a.1.2: removal
    node.track("o", "t", "k2", {})
    assert refs(node.get_by_key("t", "k")) == ["a.1.3"]
    assert refs(node.untrack("o", "t", "k2").leaves) == ["a.1.4"]
    assert refs(node.untrack_owner("o").leaves) == ["a.1.3"]
    assert node.list("t") == []
    assert node.peers() == {}


# --- GP2: heartbeat cadence ---------------------------------------------------------------------


def test_gp2_first_tick_broadcasts_an_empty_heartbeat_with_the_clock() -> None:
    output = shard().tick(100)
    assert output == Output(sends=(Send(Heartbeat(A, {A: 0}, None)),))


def test_gp2_idle_heartbeat_every_max_silent_periods_ticks_exactly() -> None:
    """G4: with max_silent_periods = 3 an idle replica heartbeats every third tick."""
    node = shard()
    broadcasting = [tick for tick in range(13) if heartbeats(node.tick(100 * tick))]
    assert broadcasting == [0, 3, 6, 9, 12]


def test_gp2_one_silent_period_heartbeats_every_tick() -> None:
    config = Config(broadcast_period_ms=100, max_silent_periods=1, down_period_ms=200)
    node = shard(config=config)
    assert all(heartbeats(node.tick(100 * tick)) for tick in range(5))


def test_gp2_a_delta_is_broadcast_at_once_with_the_clock_and_resets_the_silence() -> None:
    node = shard()
    node.tick(0)
    assert not heartbeats(node.tick(100))
    node.track("o", "t", "k", {})
    [sent] = heartbeats(node.tick(200))
    assert sent.clock == {A: 1}
    assert sent.delta is not None and [e.counter for e in sent.delta.entries] == [1]
    assert sent.delta.context == {A: ((1, 1),)}
    assert [bool(heartbeats(node.tick(100 * tick))) for tick in (3, 4, 5)] == [False, False, True]


def test_gp2_heartbeat_is_a_broadcast() -> None:
    output = shard().tick(0)
    assert [send.to for send in output.sends] == [None]


# --- GP3 and FD2: receiving heartbeats ----------------------------------------------------------


def test_fd2_heartbeat_from_an_unknown_replica_brings_it_up() -> None:
    node = shard()
    output = node.receive(heartbeat(B), 0)
    assert output == Output(events=(ReplicaEvent(UP, B),))
    assert node.peers() == {B: Status.UP}


def test_gp3_heartbeat_delta_is_merged_after_the_sender_is_registered() -> None:
    remote = shard(B)
    remote.track("o", "t", "k", {})
    [sent] = heartbeats(remote.tick(0))
    node = shard()
    output = node.receive(sent, 0)
    assert refs(output.diff.joins) == ["b.1.1"]
    assert output.events == (ReplicaEvent(UP, B),)
    assert refs(node.list("t")) == ["b.1.1"]


def test_fd2_heartbeat_from_an_up_peer_refreshes_liveness_only() -> None:
    node = shard()
    node.receive(heartbeat(B), 0)
    assert node.receive(heartbeat(B), 500) == Output()
    assert node.tick(1200).events == ()  # 700 ms of silence is not more than down_period
    assert node.tick(1201).events == (ReplicaEvent(DOWN, B),)


def test_fd2_heartbeat_from_a_down_peer_brings_it_back_with_its_entries() -> None:
    """T67."""
    node, _ = with_entries_of(B, "k1", "k2")
    assert refs(node.tick(701).diff.leaves) == ["b.1.1", "b.1.2"]
    output = node.receive(heartbeat(B, {B: 2}), 800)
    assert refs(output.diff.joins) == ["b.1.1", "b.1.2"] and not output.diff.leaves
    assert output.events == (ReplicaEvent(UP, B),)
    assert node.peers() == {B: Status.UP}


def test_gp3_df1_rejoin_and_removal_in_one_heartbeat_report_only_the_net_change() -> None:
    """The returning peer's delta removes one of its entries: that entry was invisible before and
    after, so the diff neither joins nor leaves it."""
    node, remote = with_entries_of(B, "k1", "k2")
    node.tick(701)
    remote.untrack("o", "t", "k1")
    output = node.receive(heartbeat(B, remote.state.clock(), remote.state.take_delta()), 800)
    assert output.diff == Diff(joins=tuple(node.list("t")))
    assert refs(output.diff.joins) == ["b.1.2"]


# --- GP4: clock sampling and transfer requests --------------------------------------------------


def test_gp4_an_ahead_peer_is_asked_on_every_second_tick() -> None:
    node = shard()
    node.receive(heartbeat(B, {B: 5, A: 0}), 0)
    assert requests(node.tick(100)) == []
    output = node.tick(200)
    assert requests(output) == ["b"]
    [request] = [send.message for send in output.sends if send.to == "b"]
    assert request == TransferRequest(A, {A: 0, B: 0})


def test_gp4_a_peer_that_is_not_ahead_is_not_asked() -> None:
    node, remote = with_entries_of(B, "k")
    node.receive(heartbeat(B, remote.state.clock()), 50)
    node.tick(100)
    assert requests(node.tick(200)) == []


def test_gp4_remembered_clocks_are_forgotten_after_sampling() -> None:
    node = shard()
    node.receive(heartbeat(B, {B: 5}), 0)
    node.tick(100)
    assert requests(node.tick(200)) == ["b"]
    node.tick(300)
    assert requests(node.tick(400)) == []


def test_gp4_dominated_ahead_peers_are_dropped() -> None:
    """G16: c covers b, so b is not asked; d is incomparable with both and is asked."""
    node = shard()
    node.receive(heartbeat(B, {B: 3, C: 2}), 0)
    node.receive(heartbeat(C, {B: 3, C: 3}), 0)
    node.receive(heartbeat(D, {D: 1}), 0)
    node.tick(100)
    assert requests(node.tick(200)) == ["c", "d"]


def test_gp4_of_two_equal_clocks_the_smaller_replica_id_is_asked() -> None:
    node = shard()
    node.receive(heartbeat(C, {B: 1, C: 1}), 0)
    node.receive(heartbeat(B, {B: 1, C: 1}), 0)
    node.tick(100)
    assert requests(node.tick(200)) == ["b"]


def test_gp4_only_locally_up_peers_are_compared_and_never_the_local_replica() -> None:
    node = shard()
    node.receive(heartbeat(B, {A: 99, B: 0, ReplicaId("e", 1): 99}), 0)
    node.tick(100)
    assert requests(node.tick(200)) == []


def test_gp4_a_down_peer_is_left_out_of_the_clock_comparison() -> None:
    node = shard()
    node.receive(heartbeat(B, {B: 0}), 0)
    node.receive(heartbeat(C, {B: 4, C: 0}), 650)
    node.tick(701)  # b is down now
    assert requests(node.tick(702)) == []  # c is only ahead about b


def test_gp4_the_clock_of_a_down_sender_is_ignored() -> None:
    node = shard()
    node.receive(heartbeat(B, {B: 5}), 0)
    node.tick(701)  # b goes down (after this tick's sampling step had nothing to do)
    assert requests(node.tick(702)) == []


# --- GP5 and GP6: transfers ---------------------------------------------------------------------


def test_gp5_transfer_request_is_answered_with_the_full_state_minus_the_requesters() -> None:
    node, _ = with_entries_of(B, "k")
    node.track("o", "t", "mine", {})
    output = node.receive(TransferRequest(B, {B: 0}), 10)
    [send] = output.sends
    assert send.to == "b"
    assert isinstance(send.message, TransferAck) and send.message.sender == A
    assert send.message.payload == node.state.full_state(B)
    assert [e.replica for e in send.message.payload.entries] == [A]
    assert output.diff == Diff() and output.events == ()


def test_gp5_an_unknown_requester_is_answered_too() -> None:
    """T58."""
    node = shard()
    node.track("o", "t", "k", {})
    [send] = node.receive(TransferRequest(C, {}), 0).sends
    assert send.to == "c" and isinstance(send.message, TransferAck)
    assert node.peers() == {}  # a request is no heartbeat


def test_gp6_transfer_ack_is_merged() -> None:
    remote = shard(B)
    remote.track("o", "t", "k", {})
    node = shard()
    node.receive(heartbeat(B, remote.state.clock()), 0)
    output = node.receive(TransferAck(B, remote.state.full_state(A)), 10)
    assert refs(output.diff.joins) == ["b.1.1"]
    assert node.state.clock()[B] == 1


def test_gp6_transfer_ack_is_not_a_sign_of_life() -> None:
    """T59."""
    node = shard()
    node.receive(heartbeat(B), 0)
    node.receive(TransferAck(B, Payload()), 650)
    assert node.tick(701).events == (ReplicaEvent(DOWN, B),)


def test_gp_transfer_round_trip_brings_a_new_node_up_to_date() -> None:
    old, new = shard(B), shard(A)
    for key in ("k1", "k2", "k3"):
        old.track("o", "t", key, {})
    old.tick(0)  # the delta goes to no one: a is not running yet
    network = Network(old, new)
    network.run(0, 4)
    assert refs(new.list("t")) == ["b.1.1", "b.1.2", "b.1.3"]
    assert new.state.clock() == old.state.clock()


# --- GP7: graceful shutdown ---------------------------------------------------------------------


def test_gp7_shutdown_broadcasts_a_graceful_permdown() -> None:
    assert shard().shutdown() == Output(sends=(Send(GracefulPermdown(A)),))


def test_gp7_graceful_permdown_forgets_the_sender_at_once() -> None:
    node, _ = with_entries_of(B, "k")
    output = node.receive(GracefulPermdown(B), 10)
    assert refs(output.diff.leaves) == ["b.1.1"]
    assert output.events == (ReplicaEvent(PERMDOWN, B),)
    assert node.peers() == {} and node.state.size() == 0
    assert node.tick(5000).events == ()  # no longer registered


def test_gp7_graceful_permdown_of_a_down_peer_leaves_nothing_twice() -> None:
    """G15."""
    node, _ = with_entries_of(B, "k")
    node.tick(701)
    output = node.receive(GracefulPermdown(B), 800)
    assert output.diff == Diff() and output.events == (ReplicaEvent(PERMDOWN, B),)


def test_gp7_graceful_permdown_from_an_unknown_replica_is_ignored() -> None:
    node = shard()
    node.receive(heartbeat(B), 0)
    assert node.receive(GracefulPermdown(C), 10) == Output()
    assert node.peers() == {B: Status.UP}


# --- FD1 and FD3: failure detection -------------------------------------------------------------


def test_fd1_thresholds_are_strict() -> None:
    node, _ = with_entries_of(B, "k", now=1000)
    output = node.tick(1700)
    assert output.events == () and output.diff == Diff()
    output = node.tick(1701)
    assert output.events == (ReplicaEvent(DOWN, B),) and refs(output.diff.leaves) == ["b.1.1"]
    output = node.tick(3000)  # already down: nothing repeated
    assert output.events == () and output.diff == Diff()
    output = node.tick(3001)
    assert output.events == (ReplicaEvent(PERMDOWN, B),) and output.diff == Diff()
    assert node.peers() == {} and node.state.size() == 0


def test_fd1_peers_are_checked_in_replica_id_order() -> None:
    node = shard()
    node.receive(heartbeat(C), 0)
    node.receive(heartbeat(B), 0)
    assert node.tick(701).events == (ReplicaEvent(DOWN, B), ReplicaEvent(DOWN, C))


def test_fd1_a_peer_silent_past_permdown_at_once_leaves_and_is_forgotten() -> None:
    node, _ = with_entries_of(B, "k")
    output = node.tick(2001)
    assert output.events == (ReplicaEvent(PERMDOWN, B),)
    assert refs(output.diff.leaves) == ["b.1.1"]


def test_fd3_a_forgotten_replica_heard_again_comes_back_new() -> None:
    node, remote = with_entries_of(B, "k")
    node.tick(2001)  # the first tick: no sampling yet
    output = node.receive(heartbeat(B, remote.state.clock()), 2100)
    assert output == Output(events=(ReplicaEvent(UP, B),))
    assert node.state.clock()[B] == 0 and node.list("t") == []
    assert requests(node.tick(2200)) == ["b"]  # its presences come back through transfer
    assert refs(node.receive(TransferAck(B, remote.state.full_state(A)), 2300).diff.joins) == [
        "b.1.1"
    ]


# --- RL4: incarnations --------------------------------------------------------------------------


def test_rl4_gp8_messages_from_the_local_name_are_ignored() -> None:
    node = shard()
    later_self = ReplicaId("a", 2)
    assert node.receive(heartbeat(later_self), 0) == Output()
    assert node.receive(TransferRequest(later_self, {}), 0) == Output()
    assert node.peers() == {}


def test_rl4_gp8_a_heartbeat_from_an_older_incarnation_is_ignored() -> None:
    """G17: no registration, no merge and no sign of life."""
    newer, older = ReplicaId("b", 2), ReplicaId("b", 1)
    node = shard()
    node.receive(heartbeat(newer), 0)
    stale = shard(older)
    stale.track("o", "t", "k", {})
    assert node.receive(heartbeat(older, {older: 1}, stale.state.take_delta()), 500) == Output()
    assert node.peers() == {newer: Status.UP} and node.state.size() == 0
    assert node.tick(701).events == (ReplicaEvent(DOWN, newer),)


def test_rl4_gp8_other_messages_from_an_older_incarnation_are_ignored() -> None:
    older = ReplicaId("b", 1)
    node = shard()
    node.receive(heartbeat(ReplicaId("b", 2)), 0)
    node.track("o", "t", "k", {})
    assert node.receive(TransferRequest(older, {}), 10) == Output()
    stale = shard(older)
    stale.track("o", "t", "k", {})
    assert node.receive(TransferAck(older, stale.state.full_state(A)), 10) == Output()
    assert node.receive(GracefulPermdown(older), 10) == Output()


def test_rl4_a_newer_incarnation_permanently_downs_the_older_first() -> None:
    """T68: the old incarnation's entries leave, then the new one is up with nothing stored."""
    node, _ = with_entries_of(B, "k")
    newer = ReplicaId("b", 2)
    output = node.receive(heartbeat(newer), 100)
    assert output.events == (ReplicaEvent(PERMDOWN, B), ReplicaEvent(UP, newer))
    assert refs(output.diff.leaves) == ["b.1.1"] and not output.diff.joins
    assert node.peers() == {newer: Status.UP}
    assert node.state.size() == 0


# --- all together -------------------------------------------------------------------------------


def test_three_shards_converge_through_partitions_and_shutdown() -> None:
    a, b, c = shard(A), shard(B), shard(C)
    network = Network(a, b, c)
    a.track("oa", "room", "alice", {"v": 1})
    b.track("ob", "room", "bob", {})
    c.track("oc", "room", "carol", {})
    now = network.run(0, 6)
    views = network.views()
    assert views["a"] == views["b"] == views["c"]
    assert [p.key for p in views["a"]] == ["alice", "bob", "carol"]

    # c is cut off long enough to be down on both sides; meanwhile both sides change.
    network.cut = {"c"}
    a.update("oa", "room", "alice", {"v": 2})
    c.untrack_owner("oc")
    c.track("oc2", "room", "dave", {})
    now = network.run(now, 9)
    assert a.peers() == {B: Status.UP, C: Status.DOWN}
    assert c.peers() == {A: Status.DOWN, B: Status.DOWN}
    assert [p.key for p in a.list("room")] == ["alice", "bob"]

    network.cut = set()
    now = network.run(now, 6)
    views = network.views()
    assert views["a"] == views["b"] == views["c"]
    assert [(p.key, p.meta.get("v")) for p in views["a"]] == [
        ("alice", 2),
        ("bob", None),
        ("dave", None),
    ]
    assert all(node.state.clock() == a.state.clock() for node in (b, c))

    network.post("c", c.shutdown())
    network.deliver(now)
    assert a.peers() == {B: Status.UP} and b.peers() == {A: Status.UP}
    assert [p.key for p in a.list("room")] == ["alice", "bob"]
    assert ("a", ReplicaEvent(PERMDOWN, C)) in network.events
