"""Replay a history (spec/vectors.md) through the implementation's shard cores.

Produces the observation JSON of every step in exactly the shape the model's
``presence_model.history.observation`` does, so the two can be compared field by field and a
history file's recorded expectations checked against the implementation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from presence.core.config import Config
from presence.core.types import (
    AlreadyTracked,
    GracefulPermdown,
    Heartbeat,
    Message,
    NotTracked,
    Presence,
    ReplicaId,
    TransferAck,
    TransferRequest,
)
from tests.support.impl_cluster import ImplCluster, ImplStep

Json = Any


def impl_config(history: Json) -> Config:
    options = history["config"]
    return Config(
        broadcast_period_ms=options["broadcast_period"],
        max_silent_periods=options["max_silent_periods"],
        down_period_ms=options["down_period"],
        permdown_period_ms=options["permdown_period"],
        clock_sample_periods=options["clock_sample_periods"],
    )


def _presences(presences: Iterable[Presence]) -> list[Json]:
    rows = [[x.topic, x.key, x.owner, json.loads(json.dumps(dict(x.meta)))] for x in presences]
    return sorted(rows, key=lambda row: (row[0], row[1], row[2], str(row[3]["phx_ref"])))


def _replica(replica: ReplicaId) -> str:
    return f"{replica.name}.{replica.vsn}"


def _kind(message: Message) -> str:
    if isinstance(message, Heartbeat):
        return "heartbeat"
    if isinstance(message, TransferRequest):
        return "transfer_req"
    if isinstance(message, TransferAck):
        return "transfer_ack"
    assert isinstance(message, GracefulPermdown)
    return "graceful_permdown"


def observation(cluster: ImplCluster, step: ImplStep, error: str | None) -> Json:
    diffs = {
        name: {"joins": _presences(diff.joins), "leaves": _presences(diff.leaves)}
        for name, diff in sorted(step.diffs.items())
        if diff
    }
    events = {
        name: [[e.kind.value, _replica(e.replica)] for e in node_events]
        for name, node_events in sorted(step.events.items())
        if node_events
    }
    nodes = {
        name: {
            "running": name in cluster.running,
            "replica": _replica(shard.replica),
            "presences": _presences(shard.state.observe()),
            "peers": {_replica(r): status.value for r, status in sorted(shard.peers().items())},
        }
        for name, shard in sorted(cluster.shards.items())
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


def apply(cluster: ImplCluster, action: Json) -> tuple[ImplStep, str | None]:
    do = action["do"]
    name = action.get("node", "")
    local_or_tick = do in ("track", "untrack", "update", "untrack_owner", "tick", "stop")
    if local_or_tick and name not in cluster.running:
        raise ValueError(f"step {do!r} on a stopped node {name!r}")
    if do == "restart" and name in cluster.running:
        raise ValueError(f"restart of a running node {name!r}: stop it first")
    if do in ("track", "untrack", "update", "untrack_owner"):
        shard = cluster.shards[name]
        try:
            if do == "track":
                diff = shard.track(action["owner"], action["topic"], action["key"], action["meta"])
            elif do == "untrack":
                diff = shard.untrack(action["owner"], action["topic"], action["key"])
            elif do == "update":
                diff = shard.update(action["owner"], action["topic"], action["key"], action["meta"])
            else:
                diff = shard.untrack_owner(action["owner"])
        except AlreadyTracked:
            return ImplStep(), "already_tracked"
        except NotTracked:
            return ImplStep(), "not_tracked"
        return ImplStep({name: diff}), None
    if do == "tick":
        return cluster.tick(name), None
    if do == "deliver":
        return cluster.deliver(action["index"]), None
    if do == "advance":
        cluster.advance(action["ms"])
    elif do == "drop":
        cluster.drop(action["index"])
    elif do == "duplicate":
        cluster.duplicate(action["index"])
    elif do == "cut":
        cluster.set_cut(frozenset((a, b) for a, b in action["links"]))
    elif do == "heal":
        cluster.set_cut(frozenset())
    elif do == "stop":
        cluster.stop(name, action["graceful"])
    elif do == "restart":
        cluster.restart(name)
    else:
        raise ValueError(f"unknown step {do!r}")
    return ImplStep(), None


def run(history: Json) -> list[Json]:
    cluster = ImplCluster(list(history["nodes"]), impl_config(history))
    observations = []
    for action in history["steps"]:
        step, error = apply(cluster, action)
        observations.append(observation(cluster, step, error))
    return observations


def load(path: Path) -> Json:
    return json.loads(path.read_text(encoding="utf-8"))
