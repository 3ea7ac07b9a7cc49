"""Three replicas of the model state and of the implementation state, driven alike.

Every rule applies one random event to both sides: local operations, delta deliveries (some lost,
some late), full-state transfers, down/up/permdown and restarts. After every step each replica's
observation, clock and peer table, and the diff the step reported, must be equal on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import presence_model.state as model
from presence.core import types as impl
from presence.core.state import State
from tests.support.observation import (
    diff_impl,
    diff_model,
    observed_impl,
    observed_model,
    payload_impl,
    payload_model,
)

NODES = ("a", "b", "c")
OWNERS = ("o1", "o2")
TOPICS = ("lobby", "room")
KEYS = ("alice", "bob")

nodes = st.sampled_from(NODES)
owners = st.sampled_from(OWNERS)
topics = st.sampled_from(TOPICS)
keys = st.sampled_from(KEYS)
metas = st.fixed_dictionaries(
    {"status": st.sampled_from(["away", "online"])},
    optional={"phx_ref": st.just("forged"), "phx_ref_prev": st.just("forged")},
)


@dataclass
class InFlight:
    """A delta on its way from one node to another, as each side produced it."""

    to: str
    model_payload: model.Payload
    impl_payload: impl.Payload


class StateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vsn = dict.fromkeys(NODES, 1)
        self.models: dict[str, model.Replica] = {}
        self.impls: dict[str, State] = {}
        self.in_flight: list[InFlight] = []

    # --- helpers --------------------------------------------------------------------------------

    def model_id(self, node: str) -> model.ReplicaId:
        return model.ReplicaId(node, self.vsn[node])

    def impl_id(self, node: str) -> impl.ReplicaId:
        return impl.ReplicaId(node, self.vsn[node])

    def same_diff(self, model_diff: model.Diff, impl_diff: impl.Diff) -> None:
        assert diff_impl(impl_diff) == diff_model(model_diff)

    def both(self, node: str, model_op: Any, impl_op: Any) -> None:
        """Apply one operation to both sides; they must fail alike or report the same diff."""
        model_error = impl_error = None
        try:
            self.models[node], model_diff = model_op(self.models[node])
        except (model.AlreadyTracked, model.NotTracked) as error:
            model_error = type(error).__name__
        try:
            impl_diff = impl_op(self.impls[node])
        except (impl.AlreadyTracked, impl.NotTracked) as error:
            impl_error = type(error).__name__
        assert model_error == impl_error
        if model_error is None:
            self.same_diff(model_diff, impl_diff)

    def introduce(self, at: str, of: str, vsn: int | None = None) -> None:
        """Let ``at`` hear of an incarnation of ``of``, the current one by default (RL4, RL1)."""
        vsn = self.vsn[of] if vsn is None else vsn
        model_id, impl_id = model.ReplicaId(of, vsn), impl.ReplicaId(of, vsn)
        m_state, accepted, m_retired = model.observe_incarnation(self.models[at], model_id)
        i_accepted, i_retired = self.impls[at].observe_incarnation(impl_id)
        assert accepted == i_accepted
        self.same_diff(m_retired, i_retired)
        self.models[at] = m_state
        if accepted:
            self.models[at], m_diff = model.replica_up(self.models[at], model_id)
            self.same_diff(m_diff, self.impls[at].replica_up(impl_id))

    # --- rules ----------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        for node in NODES:
            self.models[node] = model.new_replica(self.model_id(node))
            self.impls[node] = State(self.impl_id(node))
        for at in NODES:
            for of in NODES:
                if at != of:
                    self.introduce(at, of)

    @rule(node=nodes, owner=owners, topic=topics, key=keys, meta=metas)
    def track(self, node: str, owner: str, topic: str, key: str, meta: dict[str, Any]) -> None:
        self.both(
            node,
            lambda s: model.track(s, owner, topic, key, meta),
            lambda s: s.track(owner, topic, key, meta),
        )

    def handle(self, data: st.DataObject) -> tuple[str, str, str, str]:
        """A (node, owner, topic, key): mostly one that is tracked, so removals hit something."""
        tracked = sorted(
            (node, e.owner, e.topic, e.key)
            for node, replica in self.models.items()
            for e in replica.entries
            if e.dot.replica == replica.me
        )
        if tracked and data.draw(st.integers(0, 4), label="pick tracked") > 0:
            return data.draw(st.sampled_from(tracked), label="handle")
        return data.draw(st.tuples(nodes, owners, topics, keys), label="handle")

    @rule(data=st.data())
    def untrack(self, data: st.DataObject) -> None:
        node, owner, topic, key = self.handle(data)
        self.both(
            node,
            lambda s: model.untrack(s, owner, topic, key),
            lambda s: s.untrack(owner, topic, key),
        )

    @rule(data=st.data(), meta=metas)
    def update(self, data: st.DataObject, meta: dict[str, Any]) -> None:
        node, owner, topic, key = self.handle(data)
        self.both(
            node,
            lambda s: model.update(s, owner, topic, key, meta),
            lambda s: s.update(owner, topic, key, meta),
        )

    @rule(data=st.data())
    def owner_exits(self, data: st.DataObject) -> None:
        node, owner, _, _ = self.handle(data)
        self.both(
            node, lambda s: model.untrack_owner(s, owner), lambda s: s.untrack_owner(owner)
        )

    @rule(node=nodes, reach=st.sets(nodes), late=st.booleans())
    def broadcast_delta(self, node: str, reach: set[str], late: bool) -> None:
        """Take a node's delta; it reaches the nodes in ``reach`` (now, or queued when ``late``)
        and is lost on the way to the others."""
        self.models[node], model_delta = model.take_delta(self.models[node])
        impl_delta = self.impls[node].take_delta()
        assert payload_impl(impl_delta) == payload_model(model_delta)
        if model_delta is None or impl_delta is None:
            return
        for to in sorted(reach - {node}):
            message = InFlight(to, model_delta, impl_delta)
            if late:
                self.in_flight.append(message)
            else:
                self.merge_into(message)

    def merge_into(self, message: InFlight) -> None:
        self.models[message.to], model_diff = model.merge(
            self.models[message.to], message.model_payload
        )
        self.same_diff(model_diff, self.impls[message.to].merge(message.impl_payload))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.in_flight) - 1), label="message")
        self.merge_into(self.in_flight.pop(index))

    @rule(source=nodes, destination=nodes)
    def transfer(self, source: str, destination: str) -> None:
        if source == destination:
            return
        model_payload = model.full_state(self.models[source], self.model_id(destination))
        impl_payload = self.impls[source].full_state(self.impl_id(destination))
        assert payload_impl(impl_payload) == payload_model(model_payload)
        self.models[destination], model_diff = model.merge(
            self.models[destination], model_payload
        )
        self.same_diff(model_diff, self.impls[destination].merge(impl_payload))

    @rule(at=nodes, of=nodes, change=st.sampled_from(["down", "up", "permdown"]))
    def peer_status(self, at: str, of: str, change: str) -> None:
        """What failure detection would decide: ``at`` takes ``of`` down, up or permdown."""
        if change == "up":
            if at != of:
                self.introduce(at, of)
            return
        model_change = model.replica_down if change == "down" else model.replica_permdown
        self.models[at], model_diff = model_change(self.models[at], self.model_id(of))
        impl_state = self.impls[at]
        impl_change = impl_state.replica_down if change == "down" else impl_state.replica_permdown
        self.same_diff(model_diff, impl_change(self.impl_id(of)))

    @rule(at=nodes, of=nodes, back=st.integers(1, 2))
    def stale_incarnation(self, at: str, of: str, back: int) -> None:
        """A late message from an earlier incarnation of ``of`` reaches ``at`` (RL4)."""
        if at != of and self.vsn[of] > back:
            self.introduce(at, of, self.vsn[of] - back)

    @rule(node=nodes)
    def restart(self, node: str) -> None:
        """A new incarnation with nothing tracked; peers learn of it through ``up``."""
        self.vsn[node] += 1
        self.models[node] = model.new_replica(self.model_id(node))
        self.impls[node] = State(self.impl_id(node))
        for at in NODES:
            if at != node:
                self.introduce(node, at)

    def teardown(self) -> None:
        """Settle at the end of every history: everyone hears everyone and exchanges full
        states, and then all replicas must agree. (Not a rule: settling mid-history heals the
        gaps and stale contexts where the interesting bugs live.)"""
        if not self.models:
            return
        for at in NODES:
            for of in NODES:
                if at != of:
                    self.introduce(at, of)
        for _ in range(2):
            for source in NODES:
                for destination in NODES:
                    self.transfer(source, destination)
        views = {node: model.observe(self.models[node]) for node in NODES}
        assert views["a"] == views["b"] == views["c"], views

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def same_observations(self) -> None:
        for node in self.models:
            assert observed_impl(self.impls[node].observe()) == observed_model(
                model.observe(self.models[node])
            ), node

    @invariant()
    def same_clocks_and_peers(self) -> None:
        for node in self.models:
            assert dict(self.impls[node].clock()) == dict(model.clock(self.models[node])), node
            impl_peers = {tuple(r): s.value for r, s in self.impls[node].peers().items()}
            assert impl_peers == {tuple(r): s for r, s in self.models[node].status}, node


StateMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStateVsModel = StateMachine.TestCase
