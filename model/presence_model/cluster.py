"""A whole cluster of model nodes and the network between them, driven one event at a time.

The network is an explicit tuple of messages in flight, which a driver delivers, drops, duplicates
or reorders by position; connectivity is the set of directed links that are cut (a message over a
cut link is lost when sent and when delivered). Time is a number the driver advances. Everything is
an immutable value, so histories can be replayed, compared and enumerated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from presence_model import protocol as p
from presence_model import state as s


class Envelope(NamedTuple):
    """A message in flight from one node to another."""

    source: str
    destination: str
    message: p.Message


class Step(NamedTuple):
    """IN2: what one event made each node report: its diff and its peer events."""

    diffs: tuple[tuple[str, s.Diff], ...] = ()
    events: tuple[tuple[str, tuple[p.Event, ...]], ...] = ()


@dataclass(frozen=True)
class Cluster:
    """A set of named nodes (running or stopped), the messages in flight and the cut links."""

    config: p.Config
    nodes: tuple[tuple[str, p.Node], ...]
    running: frozenset[str]
    incarnation: tuple[tuple[str, int], ...]
    in_flight: tuple[Envelope, ...] = ()
    cut: frozenset[tuple[str, str]] = frozenset()
    now: int = 0

    def node(self, name: str) -> p.Node:
        return dict(self.nodes)[name]

    def names(self) -> list[str]:
        return [name for name, _ in self.nodes]


def new_cluster(names: list[str], config: p.Config) -> Cluster:
    """GP2 ID1: every node starts running as incarnation 1 and knows nobody until heard."""
    return Cluster(
        config=config,
        nodes=tuple((name, p.new_node(s.ReplicaId(name, 1), config)) for name in sorted(names)),
        running=frozenset(names),
        incarnation=tuple((name, 1) for name in sorted(names)),
    )


def _with_node(cluster: Cluster, name: str, node: p.Node) -> Cluster:
    return replace(cluster, nodes=tuple((n, node if n == name else x) for n, x in cluster.nodes))


def _post(cluster: Cluster, source: str, sends: tuple[p.Send, ...]) -> Cluster:
    """GP1: a broadcast goes to every other node; a message over a cut link is lost at once."""
    posted = list(cluster.in_flight)
    for send in sends:
        targets = [send.to] if send.to is not None else cluster.names()
        for destination in targets:
            if destination != source and (source, destination) not in cluster.cut:
                posted.append(Envelope(source, destination, send.message))
    return replace(cluster, in_flight=tuple(posted))


def _report(name: str, output: p.Output) -> Step:
    return Step(((name, output.diff),), ((name, output.events),))


def local(cluster: Cluster, name: str, operation: Any, *args: Any) -> tuple[Cluster, Step]:
    """OP1 OP2 OP3 OP4: a local operation on a running node."""
    node, diff = p.local(cluster.node(name), operation, *args)
    return _with_node(cluster, name, node), Step(((name, diff),))


def tick(cluster: Cluster, name: str) -> tuple[Cluster, Step]:
    """GP2: one tick of a running node at the cluster's current time."""
    node, output = p.tick(cluster.node(name), cluster.now)
    cluster = _post(_with_node(cluster, name, node), name, output.sends)
    return cluster, _report(name, output)


def advance(cluster: Cluster, milliseconds: int) -> Cluster:
    """FD1: time passes for everyone alike."""
    return replace(cluster, now=cluster.now + milliseconds)


def deliver(cluster: Cluster, index: int) -> tuple[Cluster, Step]:
    """GP3 GP5 GP6 GP7: hand the message at ``index`` to its destination, if it can get there."""
    envelope = cluster.in_flight[index]
    rest = cluster.in_flight[:index] + cluster.in_flight[index + 1 :]
    cluster = replace(cluster, in_flight=rest)
    if (
        envelope.destination not in cluster.running
        or (envelope.source, envelope.destination) in cluster.cut
    ):
        return cluster, Step()
    node, output = p.receive(cluster.node(envelope.destination), envelope.message, cluster.now)
    cluster = _post(_with_node(cluster, envelope.destination, node), envelope.destination,
                    output.sends)
    return cluster, _report(envelope.destination, output)


def drop(cluster: Cluster, index: int) -> Cluster:
    """GP1: the network may lose any message."""
    return replace(cluster, in_flight=cluster.in_flight[:index] + cluster.in_flight[index + 1 :])


def duplicate(cluster: Cluster, index: int) -> Cluster:
    """GP1: the network may deliver a message twice (the copy goes to the back)."""
    return replace(cluster, in_flight=(*cluster.in_flight, cluster.in_flight[index]))


def set_cut(cluster: Cluster, links: frozenset[tuple[str, str]]) -> Cluster:
    """GP1: the directed links that lose every message, from now on (empty: healed)."""
    return replace(cluster, cut=links)


def stop(cluster: Cluster, name: str, graceful: bool) -> tuple[Cluster, Step]:
    """GP7: a node stops; a graceful stop first announces its permanent departure."""
    if graceful:
        cluster = _post(cluster, name, p.shutdown(cluster.node(name)).sends)
    return replace(cluster, running=cluster.running - {name}), Step()


def restart(cluster: Cluster, name: str) -> Cluster:
    """ID1 RL4: a (re)started node is a new incarnation with nothing tracked."""
    vsn = dict(cluster.incarnation)[name] + 1
    node = p.new_node(s.ReplicaId(name, vsn), cluster.config)
    cluster = _with_node(cluster, name, node)
    return replace(
        cluster,
        running=cluster.running | {name},
        incarnation=tuple((n, vsn if n == name else v) for n, v in cluster.incarnation),
    )


def expected_view(cluster: Cluster) -> list[s.Presence]:
    """IN1: the presences every running node must list once the cluster has settled: the live
    local entries of every running node."""
    return sorted(
        (
            s.Presence(e.topic, e.key, e.owner, e.meta)
            for name in cluster.running
            for e in cluster.node(name).replica.entries
            if e.dot.replica == cluster.node(name).me
        ),
        key=s.observation_order,
    )
