"""Random cluster histories through the model cluster and the implementation's shard cores.

Both clusters get the same events: local operations, ticks, time passing, deliveries, losses and
duplicates of any message in flight, partitions (full and partial) and heals, crashes, graceful
stops and restarts. After every step, every node's observation, peer table and reported diff and
events, and the messages in flight, must be the same on both sides. A settle step heals the
network and lets periods pass: every running node must then list the live presences of every
running node.
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import networkx as nx
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import presence_model.cluster as mc
import presence_model.protocol as mp
import presence_model.state as ms
from presence.core.config import Config
from presence.core.types import AlreadyTracked, NotTracked
from tests.support.impl_cluster import ImplCluster
from tests.support.observation import (
    diff_impl,
    diff_model,
    events_impl,
    events_model,
    message_impl,
    message_model,
    observed_impl,
    observed_model,
)

NODES = ("a", "b", "c")
OWNERS = ("o1", "o2")
TOPICS = ("lobby", "room")
KEYS = ("alice", "bob")
PERIOD = 100
MODEL_CONFIG = mp.Config(
    broadcast_period=PERIOD,
    max_silent_periods=3,
    down_period=500,
    permdown_period=1500,
    clock_sample_periods=2,
)
IMPL_CONFIG = Config(
    broadcast_period_ms=PERIOD,
    max_silent_periods=3,
    down_period_ms=500,
    permdown_period_ms=1500,
    clock_sample_periods=2,
)
SETTLE_ROUNDS = 12  # > down_period / PERIOD, plus heartbeat, sampling and transfer rounds

nodes = st.sampled_from(NODES)
metas = st.fixed_dictionaries(
    {"status": st.sampled_from(["away", "online"])},
    optional={"phx_ref": st.just("forged"), "phx_ref_prev": st.just("forged")},
)
links = st.frozensets(st.sampled_from([(x, y) for x in NODES for y in NODES if x != y]))


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = mc.new_cluster(list(NODES), MODEL_CONFIG)
        self.impl = ImplCluster(list(NODES), IMPL_CONFIG)

    # --- comparison of one step -----------------------------------------------------------------

    def same_step(self, model_step: mc.Step, impl_step: Any) -> None:
        model_diffs = {name: diff_model(diff) for name, diff in model_step.diffs}
        impl_diffs = {name: diff_impl(diff) for name, diff in impl_step.diffs.items()}
        assert impl_diffs == model_diffs
        model_events = {name: events_model(e) for name, e in model_step.events if e}
        impl_events = {name: events_impl(e) for name, e in impl_step.events.items() if e}
        assert impl_events == model_events
        for events in model_events.values():
            for kind, *_ in events:
                event(f"peer went {kind}")

    def local(self, name: str, model_op: Any, impl_op: Any) -> None:
        model_error = impl_error = None
        try:
            self.model, model_step = mc.local(self.model, name, *model_op)
        except (ms.AlreadyTracked, ms.NotTracked) as error:
            model_error = type(error).__name__
        try:
            impl_diff = impl_op(self.impl.shards[name])
        except (AlreadyTracked, NotTracked) as error:
            impl_error = type(error).__name__
        assert impl_error == model_error
        if model_error is None:
            assert diff_impl(impl_diff) == diff_model(dict(model_step.diffs)[name])

    def handle(self, data: st.DataObject) -> tuple[str, str, str, str]:
        """Mostly a tracked (node, owner, topic, key) of a running node, so removals hit."""
        tracked = sorted(
            (name, e.owner, e.topic, e.key)
            for name in self.model.running
            for e in self.model.node(name).replica.entries
            if e.dot.replica == self.model.node(name).me
        )
        if tracked and data.draw(st.integers(0, 4), label="pick tracked") > 0:
            return data.draw(st.sampled_from(tracked), label="handle")
        name = data.draw(st.sampled_from(sorted(self.model.running)), label="node")
        owner, topic, key = data.draw(
            st.tuples(st.sampled_from(OWNERS), st.sampled_from(TOPICS), st.sampled_from(KEYS)),
            label="handle",
        )
        return name, owner, topic, key

    def running(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.model.running)), label="node")

    # --- local operations ---------------------------------------------------------------------

    @precondition(lambda self: self.model.running)
    @rule(data=st.data(), owner=st.sampled_from(OWNERS), topic=st.sampled_from(TOPICS),
          key=st.sampled_from(KEYS), meta=metas)
    def track(self, data: st.DataObject, owner: str, topic: str, key: str,
              meta: dict[str, Any]) -> None:
        name = self.running(data)
        self.local(name, (ms.track, owner, topic, key, meta),
                   lambda shard: shard.track(owner, topic, key, meta))

    @precondition(lambda self: self.model.running)
    @rule(data=st.data())
    def untrack(self, data: st.DataObject) -> None:
        name, owner, topic, key = self.handle(data)
        self.local(name, (ms.untrack, owner, topic, key),
                   lambda shard: shard.untrack(owner, topic, key))

    @precondition(lambda self: self.model.running)
    @rule(data=st.data(), meta=metas)
    def update(self, data: st.DataObject, meta: dict[str, Any]) -> None:
        name, owner, topic, key = self.handle(data)
        self.local(name, (ms.update, owner, topic, key, meta),
                   lambda shard: shard.update(owner, topic, key, meta))

    @precondition(lambda self: self.model.running)
    @rule(data=st.data())
    def owner_exits(self, data: st.DataObject) -> None:
        name, owner, _, _ = self.handle(data)
        self.local(name, (ms.untrack_owner, owner), lambda shard: shard.untrack_owner(owner))

    # --- time and the network -------------------------------------------------------------------

    @precondition(lambda self: self.model.running)
    @rule(data=st.data())
    def tick(self, data: st.DataObject) -> None:
        name = self.running(data)
        self.model, model_step = mc.tick(self.model, name)
        self.same_step(model_step, self.impl.tick(name))

    @rule(milliseconds=st.sampled_from([PERIOD // 2, PERIOD, 2 * PERIOD, 600, 1600]))
    def advance(self, milliseconds: int) -> None:
        self.model = mc.advance(self.model, milliseconds)
        self.impl.advance(milliseconds)

    def pick_message(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, len(self.model.in_flight) - 1), label="message")

    @precondition(lambda self: self.model.in_flight)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        index = self.pick_message(data)
        if index != 0:
            event("delivered out of order")
        self.label_delivery(self.model.in_flight[index])
        self.model, model_step = mc.deliver(self.model, index)
        self.same_step(model_step, self.impl.deliver(index))

    def label_delivery(self, envelope: mc.Envelope) -> None:
        message = envelope.message
        if not isinstance(message, mp.Heartbeat):
            event(f"delivered {type(message).__name__}")
        elif message.sender != self.model.node(message.sender.name).me:
            event("delivered a heartbeat of an older incarnation")
        if isinstance(message, mp.TransferAck) and any(
            isinstance(other.message, mp.Heartbeat) and other.message.delta is not None
            for other in self.model.in_flight
            if other.destination == envelope.destination
        ):
            event("transfer raced a delta")

    @precondition(lambda self: self.model.in_flight)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        index = self.pick_message(data)
        self.model = mc.drop(self.model, index)
        self.impl.drop(index)

    @precondition(lambda self: self.model.in_flight)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        index = self.pick_message(data)
        self.model = mc.duplicate(self.model, index)
        self.impl.duplicate(index)

    @rule(cut=links)
    def partition(self, cut: frozenset[tuple[str, str]]) -> None:
        graph = nx.DiGraph()
        graph.add_nodes_from(NODES)
        graph.add_edges_from((x, y) for x in NODES for y in NODES if x != y and (x, y) not in cut)
        if cut and nx.is_strongly_connected(graph):
            event("partial partition (everyone still reachable some way)")
        elif cut:
            event("partition")
        if any((y, x) not in cut for x, y in cut):
            event("asymmetric link cut")
        self.model = mc.set_cut(self.model, cut)
        self.impl.set_cut(cut)

    @rule()
    def heal(self) -> None:
        if any(
            self.model.node(a).replica.status_of(self.model.node(b).me) == ms.DOWN
            for a in self.model.running
            for b in self.model.running
            if a != b
        ):
            event("heal while a peer is down")
        self.model = mc.set_cut(self.model, frozenset())
        self.impl.set_cut(frozenset())

    # --- crashes, stops and restarts ------------------------------------------------------------

    @precondition(lambda self: len(self.model.running) > 1)
    @rule(data=st.data(), graceful=st.booleans())
    def stop(self, data: st.DataObject, graceful: bool) -> None:
        name = self.running(data)
        self.model, _ = mc.stop(self.model, name, graceful)
        self.impl.stop(name, graceful)

    @precondition(lambda self: len(self.model.running) < len(NODES))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        stopped = sorted(set(NODES) - self.model.running)
        name = data.draw(st.sampled_from(stopped), label="node")
        if any(e.source == name for e in self.model.in_flight):
            event("restart while an old message is in flight")
        self.model = mc.restart(self.model, name)
        self.impl.restart(name)

    # --- settle: heal, let periods pass, check convergence -------------------------------------

    @rule()
    def settle(self) -> None:
        self.heal()
        for _ in range(SETTLE_ROUNDS):
            self.advance(PERIOD)
            for name in sorted(self.model.running):
                self.model, model_step = mc.tick(self.model, name)
                self.same_step(model_step, self.impl.tick(name))
            deliveries = 0
            while self.model.in_flight:
                self.model, model_step = mc.deliver(self.model, 0)
                self.same_step(model_step, self.impl.deliver(0))
                deliveries += 1
                assert deliveries < 1000, "the cluster does not quiesce"
        expected = observed_model(mc.expected_view(self.model))
        for name in sorted(self.model.running):
            assert observed_model(mp.observe(self.model.node(name))) == expected, name
        event("settled and converged")

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def same_nodes(self) -> None:
        for name in NODES:
            model_node, shard = self.model.node(name), self.impl.shards[name]
            assert observed_impl(shard.state.observe()) == observed_model(mp.observe(model_node))
            impl_peers = {tuple(r): st.value for r, st in shard.peers().items()}
            assert impl_peers == {tuple(r): st for r, st in model_node.replica.status}, name
            assert dict(shard.state.clock()) == dict(ms.clock(model_node.replica)), name
        assert self.impl.running == set(self.model.running)

    @invariant()
    def same_messages_in_flight(self) -> None:
        model_messages = [
            (e.source, e.destination, message_model(e.message)) for e in self.model.in_flight
        ]
        impl_messages = [
            (e.source, e.destination, message_impl(e.message)) for e in self.impl.in_flight
        ]
        assert impl_messages == model_messages


ProtocolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestProtocolVsModel = ProtocolMachine.TestCase
