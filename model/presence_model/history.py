"""Histories: a language-neutral list of cluster events, run through the model cluster.

A history is JSON (format described in spec/vectors.md). Running one yields, after every step,
the *observation* of the whole cluster: what every node lists, its peer table, the diff and peer
events the step made each node report, any error a local operation raised, and the messages in
flight. That observation is what another implementation must reproduce step by step.
"""

from __future__ import annotations

import json
from typing import Any

from presence_model import cluster as c
from presence_model import protocol as p
from presence_model import state as s

FORMAT = "presence-history/1"

Json = Any


def config_of(history: Json) -> p.Config:
    """GP2 FD1: the timing options a history runs with."""
    options = history["config"]
    return p.Config(
        broadcast_period=options["broadcast_period"],
        max_silent_periods=options["max_silent_periods"],
        down_period=options["down_period"],
        permdown_period=options["permdown_period"],
        clock_sample_periods=options["clock_sample_periods"],
    )


def _presences(presences: list[s.Presence] | tuple[s.Presence, ...]) -> list[Json]:
    ordered = sorted(presences, key=s.observation_order)
    return [[x.topic, x.key, x.owner, json.loads(x.meta)] for x in ordered]


def _replica(replica: s.ReplicaId) -> str:
    return f"{replica.name}.{replica.vsn}"


def observation(cluster: c.Cluster, step: c.Step, error: str | None) -> Json:
    """IN2: the observation of the whole cluster after one step."""
    diffs = {
        name: {"joins": _presences(diff.joins), "leaves": _presences(diff.leaves)}
        for name, diff in step.diffs
        if diff.joins or diff.leaves
    }
    events = {
        name: [[e.kind, _replica(e.replica)] for e in node_events]
        for name, node_events in step.events
        if node_events
    }
    nodes = {
        name: {
            "running": name in cluster.running,
            "replica": _replica(node.me),
            "presences": _presences(p.observe(node)),
            "peers": {_replica(r): status for r, status in node.replica.status},
        }
        for name, node in cluster.nodes
    }
    in_flight = [
        [e.source, e.destination, _kind(e.message), _replica(e.message.sender)]
        for e in cluster.in_flight
    ]
    return {
        "error": error,
        "diffs": diffs,
        "events": events,
        "nodes": nodes,
        "in_flight": in_flight,
    }


def _kind(message: p.Message) -> str:
    return {
        p.Heartbeat: "heartbeat",
        p.TransferReq: "transfer_req",
        p.TransferAck: "transfer_ack",
        p.GracefulPermdown: "graceful_permdown",
    }[type(message)]


def _local_operation(action: Json) -> tuple[Any, ...]:
    """The state function and arguments of a local operation step."""
    do = action["do"]
    if do == "track":
        return (s.track, action["owner"], action["topic"], action["key"], action["meta"])
    if do == "untrack":
        return (s.untrack, action["owner"], action["topic"], action["key"])
    if do == "update":
        return (s.update, action["owner"], action["topic"], action["key"], action["meta"])
    return (s.untrack_owner, action["owner"])


LOCAL_OPERATIONS = ("track", "untrack", "update", "untrack_owner")


def apply(cluster: c.Cluster, action: Json) -> tuple[c.Cluster, c.Step, str | None]:
    """OP1 OP2 OP3 OP4 GP1 GP2 GP7: apply one history step to the model cluster."""
    do = action["do"]
    if do in (*LOCAL_OPERATIONS, "tick", "stop") and action["node"] not in cluster.running:
        raise ValueError(f"step {do!r} on a stopped node {action['node']!r}")
    if do == "restart" and action["node"] in cluster.running:
        raise ValueError(f"restart of a running node {action['node']!r}: stop it first")
    if do in LOCAL_OPERATIONS:
        try:
            cluster, step = c.local(cluster, action["node"], *_local_operation(action))
        except s.AlreadyTracked:
            return cluster, c.Step(), "already_tracked"
        except s.NotTracked:
            return cluster, c.Step(), "not_tracked"
        return cluster, step, None
    if do == "tick":
        cluster, step = c.tick(cluster, action["node"])
        return cluster, step, None
    if do == "advance":
        return c.advance(cluster, action["ms"]), c.Step(), None
    if do == "deliver":
        cluster, step = c.deliver(cluster, action["index"])
        return cluster, step, None
    if do == "drop":
        return c.drop(cluster, action["index"]), c.Step(), None
    if do == "duplicate":
        return c.duplicate(cluster, action["index"]), c.Step(), None
    if do == "cut":
        links = frozenset((a, b) for a, b in action["links"])
        return c.set_cut(cluster, links), c.Step(), None
    if do == "heal":
        return c.set_cut(cluster, frozenset()), c.Step(), None
    if do == "stop":
        cluster, step = c.stop(cluster, action["node"], action["graceful"])
        return cluster, step, None
    if do == "restart":
        return c.restart(cluster, action["node"]), c.Step(), None
    raise ValueError(f"unknown step {do!r}")


def run(history: Json) -> list[Json]:
    """IN2: the observation after every step of a history, as the model computes it."""
    cluster = c.new_cluster(history["nodes"], config_of(history))
    observations = []
    for action in history["steps"]:
        cluster, step, error = apply(cluster, action)
        observations.append(observation(cluster, step, error))
    return observations


def dumps(history: Json) -> str:
    """IN2: the canonical text of a history: one step and one observation per line, so that a file
    reads top to bottom and regenerates byte for byte."""

    def line(value: Json) -> str:
        return json.dumps(value, sort_keys=True, separators=(", ", ": "), ensure_ascii=False)

    head = {k: v for k, v in history.items() if k not in ("steps", "expect")}
    parts = ["{"]
    for key in sorted(head):
        parts.append(f"  {json.dumps(key)}: {line(head[key])},")
    for key in ("steps", "expect"):
        rows = history.get(key, [])
        parts.append(f"  {json.dumps(key)}: [")
        parts.extend(f"    {line(row)}," for row in rows)
        if rows:
            parts[-1] = parts[-1][:-1]
        parts.append("  ],")
    parts[-1] = parts[-1][:-1]
    parts.append("}")
    return "\n".join(parts) + "\n"
