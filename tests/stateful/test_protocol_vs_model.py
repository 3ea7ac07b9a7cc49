"""Random cluster histories through the model cluster and the implementation's shard cores.

Both clusters get the same events: local operations, ticks, time passing, deliveries, losses and
duplicates of any message in flight, partitions (full and partial) and heals, crashes, graceful
stops and restarts. After every step, every node's observation, peer table and reported diff and
events, and the messages in flight, must be the same on both sides. A settle step heals the
network and lets periods pass: every running node must then list the live presences of every
running node.
"""

from __future__ import annotations

from typing import Any, ClassVar

import hypothesis.strategies as st
import networkx as nx
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import presence_model.cluster as mc
import presence_model.history as mh
import presence_model.protocol as mp
import presence_model.state as ms
from tests.support import replay
from tests.support.impl_cluster import ImplCluster
from tests.support.observation import (
    message_impl,
    message_model,
    observed_model,
    payload_impl,
    payload_model,
)
from tests.support.regressions import save_regression
from tests.support.statistics import STATISTICS, label

NODES = ("a", "b", "c")
OWNERS = ("o1", "o2")
TOPICS = ("lobby", "room")
KEYS = ("alice", "bob")
PERIOD = 100
CONFIGS = [
    {  # Phoenix's proportions, scaled down
        "broadcast_period": PERIOD,
        "max_silent_periods": 3,
        "down_period": 500,
        "permdown_period": 1500,
        "clock_sample_periods": 2,
    },
    {  # every tick samples, so transfers are frequent and race the deltas
        "broadcast_period": PERIOD,
        "max_silent_periods": 2,
        "down_period": 300,
        "permdown_period": 900,
        "clock_sample_periods": 1,
    },
]
SETTLE_ROUNDS = 12  # > down_period / PERIOD, plus heartbeat, sampling and transfer rounds

nodes = st.sampled_from(NODES)
metas = st.fixed_dictionaries(
    {"status": st.sampled_from(["away", "online"])},
    optional={"phx_ref": st.just("forged"), "phx_ref_prev": st.just("forged")},
)
links = st.frozensets(st.sampled_from([(x, y) for x in NODES for y in NODES if x != y]))


class ProtocolMachine(RuleBasedStateMachine):
    last_history: ClassVar[list[dict[str, Any]]] = []

    last_config: ClassVar[dict[str, int]] = CONFIGS[0]

    def __init__(self) -> None:
        super().__init__()
        self.use_config(CONFIGS[0])
        STATISTICS.histories += 1

    @initialize(config=st.sampled_from(CONFIGS))
    def use_config(self, config: dict[str, int]) -> None:
        history = {"nodes": list(NODES), "config": config}
        self.model = mc.new_cluster(list(NODES), mh.config_of(history))
        self.impl = ImplCluster(list(NODES), replay.impl_config(history))
        self.history: list[dict[str, Any]] = []
        ProtocolMachine.last_history = self.history
        ProtocolMachine.last_config = config
        # Handles changed on each node since its last tick, to label same-period races.
        self.changed_this_period: dict[str, dict[tuple[str, str, str], str]] = {}

    def do(self, **action: Any) -> None:
        """Apply one history step to both clusters and compare what every node observes."""
        self.history.append(action)
        STATISTICS.steps += 1
        self.label_same_period(action)
        if action["do"] == "deliver":
            self.label_delivery(self.model.in_flight[action["index"]])
        self.model, model_step, model_error = mh.apply(self.model, action)
        impl_step, impl_error = replay.apply(self.impl, action)
        expected = mh.observation(self.model, model_step, model_error)
        assert replay.observation(self.impl, impl_step, impl_error) == expected
        # Clocks and message contents too, at every step: inside settle and deliver_all as well.
        self.same_clocks()
        self.same_messages_in_flight()
        self.same_hidden_state()
        for events in expected["events"].values():
            for kind, _ in events:
                label(f"peer went {kind}")

    def label_same_period(self, action: dict[str, Any]) -> None:
        """Label an update and a leave, or a leave and a rejoin, within one broadcast period."""
        node, do = action.get("node", ""), action["do"]
        changed = self.changed_this_period.setdefault(node, {})
        if do == "tick":
            changed.clear()
            return
        if do not in mh.LOCAL_OPERATIONS:
            return
        handle = (action["owner"], action.get("topic", ""), action.get("key", ""))
        earlier = {k: v for k, v in changed.items() if k[0] == action["owner"]}
        if do in ("untrack", "untrack_owner") and "update" in earlier.values():
            label("an update and a leave in one period")
        if do == "track" and changed.get(handle) in ("untrack", "untrack_owner"):
            label("a leave and a rejoin in one period")
        if do == "untrack_owner":
            for key in earlier:
                changed[key] = do
        else:
            changed[handle] = do

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
        self.do(do="track", node=self.running(data), owner=owner, topic=topic, key=key, meta=meta)

    @precondition(lambda self: self.model.running)
    @rule(data=st.data())
    def untrack(self, data: st.DataObject) -> None:
        name, owner, topic, key = self.handle(data)
        self.do(do="untrack", node=name, owner=owner, topic=topic, key=key)

    @precondition(lambda self: self.model.running)
    @rule(data=st.data(), meta=metas)
    def update(self, data: st.DataObject, meta: dict[str, Any]) -> None:
        name, owner, topic, key = self.handle(data)
        self.do(do="update", node=name, owner=owner, topic=topic, key=key, meta=meta)

    @precondition(lambda self: self.model.running)
    @rule(data=st.data())
    def owner_exits(self, data: st.DataObject) -> None:
        name, owner, _, _ = self.handle(data)
        self.do(do="untrack_owner", node=name, owner=owner)

    # --- time and the network -------------------------------------------------------------------

    @precondition(lambda self: self.model.running)
    @rule(data=st.data())
    def tick(self, data: st.DataObject) -> None:
        self.do(do="tick", node=self.running(data))

    @rule(milliseconds=st.sampled_from([PERIOD // 2, PERIOD, 2 * PERIOD, 600, 1600]))
    def advance(self, milliseconds: int) -> None:
        self.do(do="advance", ms=milliseconds)

    @rule()
    def period(self) -> None:
        """One broadcast period for the whole cluster: time passes, every running node ticks."""
        self.do(do="advance", ms=PERIOD)
        for name in sorted(self.model.running):
            self.do(do="tick", node=name)

    @precondition(lambda self: self.model.in_flight)
    @rule()
    def deliver_all(self) -> None:
        """The network catches up: everything in flight (and what it provokes) is delivered."""
        for _ in range(200):
            if not self.model.in_flight:
                return
            self.do(do="deliver", index=0)
        raise AssertionError("the cluster does not quiesce")

    @precondition(lambda self: self.model.in_flight)
    @rule(data=st.data())
    def lossy_delivery(self, data: st.DataObject) -> None:
        """Each message now in flight is either delivered or lost, oldest first."""
        for _ in range(len(self.model.in_flight)):
            lost = data.draw(st.booleans(), label="lost")
            self.do(do="drop" if lost else "deliver", index=0)

    def pick_message(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, len(self.model.in_flight) - 1), label="message")

    @precondition(lambda self: self.model.in_flight)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        index = self.pick_message(data)
        if index != 0:
            label("delivered out of order")
        self.do(do="deliver", index=index)

    def label_delivery(self, envelope: mc.Envelope) -> None:
        message = envelope.message
        if not isinstance(message, mp.Heartbeat):
            label(f"delivered {type(message).__name__}")
        elif message.sender != self.model.node(message.sender.name).me:
            label("delivered a heartbeat of an older incarnation")
        others = [o.message for o in self.model.in_flight if o.destination == envelope.destination]
        is_delta = isinstance(message, mp.Heartbeat) and message.delta is not None
        if (
            isinstance(message, mp.TransferAck)
            and any(isinstance(o, mp.Heartbeat) and o.delta is not None for o in others)
        ) or (is_delta and any(isinstance(o, mp.TransferAck) for o in others)):
            label("transfer raced a delta")

    def racing(self) -> list[int]:
        """Indexes of transfer acks in flight to a node that also has a delta on its way."""
        deltas = {
            e.destination
            for e in self.model.in_flight
            if isinstance(e.message, mp.Heartbeat) and e.message.delta is not None
        }
        return [
            index
            for index, e in enumerate(self.model.in_flight)
            if isinstance(e.message, mp.TransferAck) and e.destination in deltas
        ]

    @precondition(lambda self: self.racing())
    @rule(data=st.data())
    def race_a_transfer(self, data: st.DataObject) -> None:
        """A transfer ack and a delta are both on their way to a node: deliver the ack first or
        the delta first (GP5, GP6 against GP3)."""
        ack = data.draw(st.sampled_from(self.racing()), label="ack")
        if data.draw(st.booleans(), label="ack first"):
            self.do(do="deliver", index=ack)
            return
        destination = self.model.in_flight[ack].destination
        delta = next(
            index
            for index, e in enumerate(self.model.in_flight)
            if e.destination == destination
            and isinstance(e.message, mp.Heartbeat)
            and e.message.delta is not None
        )
        self.do(do="deliver", index=delta)

    @precondition(lambda self: self.model.in_flight)
    @rule()
    def deliver_newest(self) -> None:
        """The last message sent overtakes all the others."""
        self.do(do="deliver", index=len(self.model.in_flight) - 1)

    @precondition(lambda self: self.model.in_flight)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.do(do="drop", index=self.pick_message(data))

    @precondition(lambda self: self.model.in_flight)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        self.do(do="duplicate", index=self.pick_message(data))

    @rule(cut=links)
    def partition(self, cut: frozenset[tuple[str, str]]) -> None:
        graph = nx.DiGraph()
        graph.add_nodes_from(NODES)
        graph.add_edges_from((x, y) for x in NODES for y in NODES if x != y and (x, y) not in cut)
        if cut and nx.is_strongly_connected(graph):
            label("partial partition (everyone still reachable some way)")
        elif cut:
            label("partition")
        if any((y, x) not in cut for x, y in cut):
            label("asymmetric link cut")
        self.do(do="cut", links=sorted(list(link) for link in cut))

    @rule()
    def heal(self) -> None:
        if any(
            self.model.node(a).replica.status_of(self.model.node(b).me) == ms.DOWN
            for a in self.model.running
            for b in self.model.running
            if a != b
        ):
            label("heal while a peer is down")
        self.do(do="heal")

    # --- crashes, stops and restarts ------------------------------------------------------------

    @precondition(lambda self: len(self.model.running) > 1)
    @rule(data=st.data(), graceful=st.booleans())
    def stop(self, data: st.DataObject, graceful: bool) -> None:
        self.do(do="stop", node=self.running(data), graceful=graceful)

    @precondition(lambda self: len(self.model.running) < len(NODES))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        stopped = sorted(set(NODES) - self.model.running)
        name = data.draw(st.sampled_from(stopped), label="node")
        if any(e.source == name for e in self.model.in_flight):
            label("restart while an old message is in flight")
        self.do(do="restart", node=name)

    # --- settle: heal, let periods pass, check convergence -------------------------------------

    @rule()
    def settle(self) -> None:
        self.heal()
        for _ in range(SETTLE_ROUNDS):
            self.period()
            self.deliver_all()
        expected = observed_model(mc.expected_view(self.model))
        for name in sorted(self.model.running):
            assert observed_model(mp.observe(self.model.node(name))) == expected, name
        label("settled and converged")

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def same_clocks(self) -> None:
        for name in NODES:
            model_clock = ms.clock(self.model.node(name).replica)
            assert dict(self.impl.shards[name].state.clock()) == dict(model_clock), name

    def same_hidden_state(self) -> None:
        """What no observation shows: every stored entry (down peers' too), the whole context
        (out-of-order dots included) and the latest incarnation known of every name."""
        for name in NODES:
            model_replica, state = self.model.node(name).replica, self.impl.shards[name].state
            assert payload_impl(state.full_state(None)) == payload_model(
                ms.full_state(model_replica, None)
            ), name
            latest = dict(model_replica.latest_vsn)
            assert {n: state.latest_vsn(n) for n in NODES} == {n: latest.get(n) for n in NODES}

    @invariant()
    def same_messages_in_flight(self) -> None:
        model_messages = [
            (e.source, e.destination, message_model(e.message)) for e in self.model.in_flight
        ]
        impl_messages = [
            (e.source, e.destination, message_impl(e.message)) for e in self.impl.in_flight
        ]
        assert impl_messages == model_messages


def test_protocol_vs_model() -> None:
    """Runs the machine under the active profile; a failure is saved, shrunk, as a regression
    file (tests/regressions/) that tests/test_regressions.py replays from then on."""
    try:
        run_state_machine_as_test(
            ProtocolMachine,
            settings=settings(
                stateful_step_count=50,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    except Exception as failure:
        path = save_regression(
            ProtocolMachine.last_history, NODES, ProtocolMachine.last_config, failure
        )
        failure.add_note(f"saved the shrunk history as {path}")
        raise
