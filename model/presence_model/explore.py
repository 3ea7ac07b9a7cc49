"""A bounded exhaustive explorer of model clusters: every history up to a number of events.

Starting from a fresh cluster, ``explore`` applies every event of a small alphabet to every state,
breadth first, up to ``events`` events, and checks every invariant of
``presence_model.invariants`` on every transition and every new state. States are deduplicated
(the cluster is an immutable, hashable value), after normalising what provably does not matter
(``normalise``). Breadth first means the first violation found has a shortest history; it is
returned as history steps (``presence_model.history`` format) ready to be saved as a regression.

The alphabet (``Alphabet``): on a running node, ``track``, ``untrack``, ``update`` and
``untrack_owner`` of the node's one owner on one shared topic and key (so that presences of
different nodes collide in one list), and ``tick``; time advancing by one ``broadcast_period``,
just over ``down_period`` and just over ``permdown_period`` (the amounts that change what a tick
does); delivering, dropping or duplicating any message in flight; cutting every link of one node,
and healing; stopping a node gracefully or not (while another one runs) and restarting a stopped
one. Local operations that fail or change nothing are kept: they are events a client can cause.

Standard library only and no clock: the caller passes one in to be told the run time.

CLI: ``python -m presence_model.explore --nodes a,b --events 6`` prints the figures; ``--ci``
runs the targets the test suite runs (2 nodes and 6 events, 3 nodes and 4 events), ``--deep`` one
event beyond each (2 nodes and 7 events, 3 nodes and 5 events).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from presence_model import cluster as c
from presence_model import history as mh
from presence_model import invariants as inv
from presence_model import protocol as p

Json = Any

DEFAULT_CONFIG = p.Config(
    broadcast_period=100,
    max_silent_periods=2,
    down_period=300,
    permdown_period=600,
    clock_sample_periods=2,
)
"""Small but valid (section 8): idle heartbeats every second tick, sampling every second tick."""

CONVERGENCE_MODES = ("every", "bound", "none")

CHECKS = (
    *(name for name, _ in inv.TRANSITION_CHECKS),
    *(name for name, _ in inv.STATE_CHECKS),
    "converges",
)
"""The names of every check the explorer can run."""


@dataclass(frozen=True)
class Alphabet:
    """The events the explorer tries at every state (see the module docstring)."""

    topic: str = "t"
    key: str = "k"
    operations: tuple[str, ...] = ("track", "untrack", "update", "untrack_owner")
    ticks: bool = True
    advances: tuple[str, ...] = ("period", "down", "permdown")
    network: tuple[str, ...] = ("deliver", "drop", "duplicate")
    cuts: bool = True
    stops: bool = True
    local_nodes: tuple[str, ...] | None = None
    """The nodes that run local operations (all running nodes when None)."""

    def owner(self, name: str) -> str:
        """ID3: an owner lives on one node, so each node has its own."""
        return f"owner-{name}"


def events(cluster: c.Cluster, alphabet: Alphabet) -> list[Json]:
    """OP1-OP4 GP1 GP2 GP7 FD1 ID1: every event of the alphabet valid in this cluster, in a fixed
    order (so that runs are reproducible), as ``presence_model.history`` steps."""
    config = cluster.config
    found: list[Json] = []
    running = sorted(cluster.running)
    for name in running:
        common = {"node": name, "owner": alphabet.owner(name)}
        handle = {**common, "topic": alphabet.topic, "key": alphabet.key}
        for operation in alphabet.operations:
            if alphabet.local_nodes is not None and name not in alphabet.local_nodes:
                break
            if operation == "track":
                found.append({"do": "track", **handle, "meta": {"s": "in"}})
            elif operation == "untrack":
                found.append({"do": "untrack", **handle})
            elif operation == "update":
                found.append({"do": "update", **handle, "meta": {"s": "up"}})
            elif operation == "untrack_owner":
                found.append({"do": "untrack_owner", **common})
        if alphabet.ticks:
            found.append({"do": "tick", "node": name})
    amounts = {
        "period": config.broadcast_period,
        "down": config.down_period + 1,
        "permdown": config.permdown_period + 1,
    }
    for amount in alphabet.advances:
        found.append({"do": "advance", "ms": amounts[amount]})
    for kind in alphabet.network:
        for index in range(len(cluster.in_flight)):
            found.append({"do": kind, "index": index})
    if alphabet.cuts:
        seen: set[frozenset[tuple[str, str]]] = set()
        for name in cluster.names():
            links = frozenset(
                link for other in cluster.names() if other != name
                for link in ((name, other), (other, name))
            )
            if links not in seen:
                seen.add(links)
                found.append({"do": "cut", "links": sorted(list(link) for link in links)})
        found.append({"do": "heal"})
    if alphabet.stops:
        if len(running) > 1:
            for name in running:
                for graceful in (True, False):
                    found.append({"do": "stop", "node": name, "graceful": graceful})
        for name in cluster.names():
            if name not in cluster.running:
                found.append({"do": "restart", "node": name})
    return found


def normalise(cluster: c.Cluster, *, keep_order: bool = False) -> Hashable:
    """IN1 FD1 GP1: a key such that two clusters with the same key behave alike under every
    event of the alphabet and every invariant check (a bisimulation), so one of them suffices.

    - *Time* only matters relative to when each peer was last heard (FD1 compares ``now -
      last_heard``; nothing else reads the clock), so ``now`` is dropped and each last-heard time
      becomes a silence, capped at ``permdown_period + 1``: once over ``permdown_period`` it stays
      over and the next tick permanently downs the peer whatever the exact value.
    - A *stopped node*'s state is never read again: messages to it are lost, a restart replaces
      it with a fresh node (the vsn comes from ``incarnation``, which is kept), the checks and
      ``expected_view`` look at running nodes only. Only its name is kept.
    - The *order* of messages in flight does not matter to the explorer, which delivers, drops and
      duplicates any of them: the multiset is kept. (The settle delivers the oldest first, so
      convergence results are cached under ``keep_order=True`` keys.)
    - The config is the same in every state.
    """
    cap = cluster.config.permdown_period + 1
    nodes = tuple(
        (
            name,
            (
                node.replica,
                tuple((peer, min(cluster.now - heard, cap)) for peer, heard in node.last_heard),
                node.silent_ticks,
                node.sample_countdown,
                node.clocks_heard,
            )
            if name in cluster.running
            else None,
        )
        for name, node in cluster.nodes
    )
    flight: Hashable = (
        cluster.in_flight if keep_order else frozenset(Counter(cluster.in_flight).items())
    )
    return (nodes, cluster.running, cluster.incarnation, flight, cluster.cut)


def _exact(cluster: c.Cluster, *, keep_order: bool = False) -> Hashable:
    del keep_order
    return cluster


@dataclass(frozen=True)
class Violation:
    """The first violation found and a shortest history to it."""

    messages: tuple[str, ...]
    depth: int
    steps: tuple[Json, ...]
    settle: tuple[Json, ...] = ()
    """For a convergence failure, the settle steps after ``steps`` that show it."""

    def history_steps(self) -> list[Json]:
        return [*self.steps, *self.settle]


@dataclass
class Report:
    """IN1: the figures of one exploration."""

    nodes: list[str]
    config: p.Config
    bound: int
    convergence: str
    normalised: bool
    states: int = 0
    transitions: int = 0
    histories: int = 0
    max_depth: int = 0
    seconds: float | None = None
    settle_rounds: int = 0
    settle_rounds_needed: int = 0
    """The most settle rounds any checked state needed before it stayed converged."""
    states_per_depth: list[int] = field(default_factory=list)
    violation: Violation | None = None
    complete: bool = True

    def lines(self) -> list[str]:
        """The figures as text."""
        seconds = "?" if self.seconds is None else f"{self.seconds:.1f}"
        text = [
            f"nodes {','.join(self.nodes)}, events <= {self.bound}, "
            f"{'normalised' if self.normalised else 'exact'} states, convergence checked from "
            + {"every": "every state", "bound": "the states first reached at the bound",
               "none": "no state"}[self.convergence],
            f"  states {self.states}, transitions {self.transitions}, histories "
            f"{self.histories}, max depth {self.max_depth}, seconds {seconds}",
            f"  new states per depth {self.states_per_depth}",
            f"  settle: {self.settle_rounds} rounds, at most {self.settle_rounds_needed} needed",
        ]
        if not self.complete:
            text.append("  stopped at the first violation: the figures are partial")
        if self.violation is None:
            text.append("  no violation")
        else:
            text.append(f"  VIOLATION at depth {self.violation.depth}:")
            text.extend(f"    {m}" for m in self.violation.messages)
            text.append("  history:")
            text.extend(f"    {json.dumps(step)}" for step in self.violation.steps)
            if self.violation.settle:
                text.append(f"    ... then the settle ({len(self.violation.settle)} steps)")
        return text


class _Convergence:
    """IN1: convergence checks with a cache. The settle is deterministic, so its outcome from a
    cluster depends only on the cluster's order-keeping normalised key and the rounds left; every
    intermediate state of a settle is cached with the outcome from there on."""

    def __init__(self, rounds: int, key: Callable[..., Hashable]) -> None:
        self.rounds = rounds
        self.key = key
        self.cache: dict[tuple[Hashable, int], tuple[tuple[str, ...], int | None]] = {}
        self.needed = 0

    def check(self, cluster: c.Cluster) -> list[str]:
        cluster = c.set_cut(cluster, frozenset())
        path: list[tuple[tuple[Hashable, int], int]] = []
        run_start: int | None = None  # first round of the current run of converged states
        result: tuple[tuple[str, ...], int | None] | None = None
        for done in range(self.rounds + 1):
            cache_key = (self.key(cluster, keep_order=True), self.rounds - done)
            cached = self.cache.get(cache_key)
            converged_now = not inv.not_converged(cluster)
            if converged_now and run_start is None:
                run_start = done
            elif not converged_now:
                run_start = None
            if cached is not None:
                violations, needed = cached
                if needed is None:
                    result = (violations, None)
                else:
                    result = ((), run_start if needed == 0 else done + needed)
                break
            path.append((cache_key, done))
            if done == self.rounds:
                result = ((), run_start) if converged_now else (
                    tuple(inv.not_converged(cluster)), None)
                break
            cluster, _, stuck = inv.settle_round(cluster)
            if stuck:
                result = (tuple(stuck), None)
                break
        assert result is not None
        violations, needed = result
        for cache_key, done in path:
            self.cache[cache_key] = (violations, None if needed is None else max(0, needed - done))
        if needed is not None:
            self.needed = max(self.needed, needed)
        return list(violations)


def _path(parents: list[int], actions: list[Json], state: int) -> list[Json]:
    steps: list[Json] = []
    while parents[state] >= 0:
        steps.append(actions[state])
        state = parents[state]
    return steps[::-1]


def explore(
    nodes: Sequence[str],
    events_bound: int,
    config: p.Config = DEFAULT_CONFIG,
    alphabet: Alphabet = Alphabet(),
    *,
    convergence: str = "every",
    normalised: bool = True,
    rounds: int | None = None,
    stop_at_first: bool = True,
    checks: Collection[str] | None = None,
    clock: Callable[[], float] | None = None,
) -> Report:
    """IN1 MG6 ST4 ST5 RL3 DF1: explore every history of at most ``events_bound`` events of the
    alphabet from a fresh cluster of ``nodes``, breadth first, checking every invariant on every
    transition (``invariants.check_transition``) and every new state (``invariants.check_state``),
    and convergence (``invariants.converges``) from every new state (``convergence="every"``),
    only from the states first reached at the bound (``"bound"``), or never (``"none"``).

    ``histories`` counts the distinct event sequences of length 1 to the bound, all of which
    the exploration covers (a sequence ends in a state equivalent to one explored at a depth no
    larger than its length). With ``stop_at_first``, the exploration ends at the first violation,
    which has a shortest history since every shorter one was checked first. ``checks`` names the
    checks to run (``CHECKS``; all by default).
    """
    if convergence not in CONVERGENCE_MODES:
        raise ValueError(f"convergence must be one of {CONVERGENCE_MODES}")
    chosen = set(CHECKS if checks is None else checks)
    if not chosen <= set(CHECKS):
        raise ValueError(f"unknown checks {sorted(chosen - set(CHECKS))}")
    state_checks = [(n, f) for n, f in inv.STATE_CHECKS if n in chosen]
    transition_checks = [(n, f) for n, f in inv.TRANSITION_CHECKS if n in chosen]
    if "converges" not in chosen:
        convergence = "none"
    start = clock() if clock is not None else None
    key = normalise if normalised else _exact
    settle = rounds if rounds is not None else inv.settle_rounds(config)
    report = Report(list(nodes), config, events_bound, convergence, normalised,
                    settle_rounds=settle)
    converger = _Convergence(settle, key)

    root = c.new_cluster(list(nodes), config)
    ids: dict[Hashable, int] = {key(root): 0}
    parents: list[int] = [-1]
    actions: list[Json] = [None]
    successors: dict[int, list[int]] = {}
    frontier: list[tuple[int, c.Cluster]] = [(0, root)]
    report.states_per_depth.append(1)

    def state_violations(cluster: c.Cluster, depth: int) -> tuple[list[str], bool]:
        found = [f"{name}: {v}" for name, check in state_checks for v in check(cluster)]
        if not found and (convergence == "every" or (
            convergence == "bound" and depth == events_bound
        )):
            stuck = converger.check(cluster)
            return [f"converges: {v}" for v in stuck], bool(stuck)
        return found, False

    def record(messages: list[str], depth: int, steps: list[Json], cluster: c.Cluster,
               settle_failed: bool) -> None:
        tail: list[Json] = []
        if settle_failed:
            _, tail, _ = inv.settle_steps(cluster, settle)
        report.violation = Violation(tuple(messages), depth, tuple(steps), tuple(tail))

    messages, failed = state_violations(root, 0)
    if messages:
        record(messages, 0, [], root, failed)

    for depth in range(1, events_bound + 1):
        if report.violation is not None and stop_at_first:
            break
        next_frontier: list[tuple[int, c.Cluster]] = []
        for state, cluster in frontier:
            if report.violation is not None and stop_at_first:
                break
            targets: list[int] = []
            for action in events(cluster, alphabet):
                after, step, _ = mh.apply(cluster, action)
                report.transitions += 1
                messages = [
                    f"{name}: {v}"
                    for name, check in transition_checks
                    for v in check(cluster, after, step)
                ]
                failed = False
                after_key = key(after)
                target = ids.get(after_key)
                if target is None:
                    target = len(parents)
                    ids[after_key] = target
                    parents.append(state)
                    actions.append(action)
                    next_frontier.append((target, after))
                    more, failed = state_violations(after, depth)
                    messages += more
                targets.append(target)
                if messages and report.violation is None:
                    record(messages, depth, [*_path(parents, actions, state), action], after,
                           failed)
                    if stop_at_first:
                        break
            successors[state] = targets
        if next_frontier:
            report.max_depth = depth
            report.states_per_depth.append(len(next_frontier))
        frontier = next_frontier

    report.complete = report.violation is None or not stop_at_first
    report.states = len(parents)
    report.histories = _count_histories(successors, events_bound)
    report.settle_rounds_needed = converger.needed
    if clock is not None and start is not None:
        report.seconds = clock() - start
    return report


def _count_histories(successors: dict[int, list[int]], bound: int) -> int:
    """The number of event sequences of length 1..bound: paths from the root in the explored
    graph (every state a sequence shorter than the bound reaches was expanded)."""
    total = 0
    paths: dict[int, int] = {0: 1}
    for _ in range(bound):
        following: dict[int, int] = {}
        for state, count in paths.items():
            for target in successors.get(state, []):
                following[target] = following.get(target, 0) + count
        total += sum(following.values())
        paths = following
    return total


def config_json(config: p.Config) -> dict[str, int]:
    """Section 8: the timing options as a history file writes them."""
    return dict(config._asdict())


def regression(report: Report) -> Json:
    """IN2: the violation as a ``presence-history/1`` file (format in spec/vectors.md), with the
    model's observation after every step, to be saved under tests/regressions/."""
    if report.violation is None:
        raise ValueError("no violation to save")
    steps = report.violation.history_steps()
    history: Json = {
        "format": mh.FORMAT,
        "description": "found by the explorer: " + report.violation.messages[0][:300],
        "nodes": list(report.nodes),
        "config": config_json(report.config),
        "steps": steps,
    }
    digest = hashlib.sha256(mh.dumps({"steps": steps}).encode()).hexdigest()[:12]
    history["name"] = f"regression-{digest}"
    history["expect"] = mh.run(history)
    return history


# --- command line ---------------------------------------------------------------------------------

CI_TARGETS = ((("a", "b"), 6), (("a", "b", "c"), 4))
"""The targets the test suite explores in full: 2 nodes and 6 events, 3 nodes and 4 events."""

DEEP_TARGETS = ((("a", "b"), 7), (("a", "b", "c"), 5))
"""One event beyond each CI target (about a minute each, a few hundred MB)."""


def _cpu_seconds() -> float:
    """The process's CPU time, only to print how long a run took (the model reads no clock)."""
    times = os.times()
    return times.user + times.system


def main(argv: Sequence[str] | None = None) -> int:
    """IN1: run explorations and print their figures; exit 1 on a violation."""
    parser = argparse.ArgumentParser(prog="python -m presence_model.explore",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", default="a,b", help="comma-separated node names")
    parser.add_argument("--events", type=int, default=4, help="the bound on history length")
    parser.add_argument("--ci", action="store_true",
                        help="run the CI targets: a,b with 6 events and a,b,c with 4")
    parser.add_argument("--deep", action="store_true",
                        help="run one event beyond them: a,b with 7 events and a,b,c with 5")
    parser.add_argument("--config", default=json.dumps(config_json(DEFAULT_CONFIG)),
                        help="timing options as a JSON object (history file format)")
    parser.add_argument("--convergence", choices=CONVERGENCE_MODES, default="every")
    parser.add_argument("--exact", action="store_true", help="do not normalise states")
    parser.add_argument("--rounds", type=int, default=None, help="settle rounds (default: "
                        "derived from the config)")
    parser.add_argument("--save", default=None,
                        help="write the first violation's history to this file")
    args = parser.parse_args(argv)
    config = mh.config_of({"config": json.loads(args.config)})
    runs = (
        list(DEEP_TARGETS) if args.deep
        else list(CI_TARGETS) if args.ci
        else [(tuple(n for n in args.nodes.split(",") if n), args.events)]
    )
    status = 0
    for names, bound in runs:
        report = explore(list(names), bound, config, convergence=args.convergence,
                         normalised=not args.exact, rounds=args.rounds, clock=_cpu_seconds)
        print("\n".join(report.lines()))
        sys.stdout.flush()
        if report.violation is not None:
            status = 1
            if args.save:
                with open(args.save, "w", encoding="utf-8") as out:
                    out.write(mh.dumps(regression(report)))
                print(f"  saved {args.save}")
    return status


if __name__ == "__main__":
    sys.exit(main())
