"""``presence demo``: three node processes on loopback, four phases, one verdict.

The demo keeps the ground truth (what is tracked on each node, down to each presence's ref) and,
after every disturbance, polls until every live node lists exactly the presences tracked on the
nodes it can reach, or a timeout passes:

1. users join from all three nodes, then churn (leave, re-join, change status, go offline);
2. one node is killed with SIGKILL: the others drop its users once it has been silent for the
   down period;
3. it restarts as a new incarnation and its users join again: all three converge;
4. a netsplit isolates one node from the other two, both sides churn for longer than the down
   period (each side soon lists only its own users), then the split heals: all converge, with no
   ghost (a presence that was untracked) and no loss.

Default periods: broadcast 100 ms and an idle heartbeat every 5 ticks (500 ms), so a node learns
of a change within a tenth of a second; down after 1000 ms, twice the idle interval as in the
defaults (a single late heartbeat does not flap); permdown after 10 s, longer than the netsplit,
so the heal exercises the down -> up path (hidden presences re-joined) rather than forgetting.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from presence.cli import UsageError, add_period_flags, positive_int
from presence.core.config import Config
from presence.core.types import ConfigError
from presence.runtime.cluster import (
    HOST,
    Cluster,
    ClusterError,
    Convergence,
    PresenceKey,
    Timing,
)
from presence.runtime.control import ControlError
from presence.runtime.transport import format_address

NODES = ("n1", "n2", "n3")
TOPICS = ("room:lobby", "room:dev", "room:ops", "room:sales")
STATUSES = ("online", "away", "busy")
DEMO_TIMING = Timing()

Handle = tuple[str, str, str]
"""``(topic, owner, key)``: what a node tracks for a user."""


@dataclass(frozen=True)
class DemoOptions:
    users: int = 300
    churn: int = 150
    """Churn operations per phase, spread over the nodes."""
    seed: int | None = None
    timing: Timing = DEMO_TIMING
    timeout: float = 20.0
    """Per phase, for convergence."""
    keep_running: bool = False
    log_dir: Path | None = None
    history: Path | None = None
    """A JSON-lines record of every operation, lifecycle event and convergence check."""


DEFAULTS = DemoOptions()


@dataclass(slots=True)
class PhaseResult:
    title: str
    outcome: Convergence
    totals: dict[str, int | None] = field(default_factory=dict)


class Workload:
    """Simulated users and the ground truth of what each node tracks for them.

    User ``i`` lives on node ``i % 3`` as owner ``user-i`` with key ``ui``, in one or two home
    topics; churn may also move it through the other topics.
    """

    def __init__(self, cluster: Cluster, users: int, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.users: dict[str, list[int]] = {name: [] for name in cluster.nodes}
        self.home: dict[int, tuple[str, ...]] = {}
        names = list(cluster.nodes)
        for user in range(users):
            self.users[names[user % len(names)]].append(user)
            self.home[user] = tuple(rng.sample(TOPICS, rng.choice((1, 1, 2))))
        self.tracked: dict[str, dict[Handle, str]] = {name: {} for name in cluster.nodes}

    def _meta(self, user: int) -> dict[str, Any]:
        return {"name": f"user {user}", "status": self.rng.choice(STATUSES),
                "device": self.rng.choice(("web", "mobile"))}

    async def _track(self, node: str, user: int, topic: str) -> None:
        handle = (topic, f"user-{user}", f"u{user}")
        result = await self.cluster.call(node, "track", topic=topic, owner=handle[1],
                                         key=handle[2], meta=self._meta(user))
        self.tracked[node][handle] = result["ref"]

    async def join(self, node: str) -> None:
        """Every user of ``node`` joins its home topics (after a restart: anew)."""
        self.tracked[node] = {}
        for user in self.users[node]:
            for topic in self.home[user]:
                await self._track(node, user, topic)

    async def churn(self, node: str, operations: int) -> None:
        tracked = self.tracked[node]
        for _ in range(operations):
            kind = self.rng.choices(("update", "untrack", "track", "offline"), (4, 3, 3, 1))[0]
            if kind in ("update", "untrack", "offline") and tracked:
                topic, owner, key = self.rng.choice(sorted(tracked))
                if kind == "update":
                    result = await self.cluster.call(node, "update", topic=topic, owner=owner,
                                                     key=key, meta=self._meta(int(key[1:])))
                    tracked[(topic, owner, key)] = result["ref"]
                elif kind == "untrack":
                    await self.cluster.call(node, "untrack", topic=topic, owner=owner, key=key)
                    del tracked[(topic, owner, key)]
                else:
                    await self.cluster.call(node, "untrack_owner", owner=owner)
                    for handle in [h for h in tracked if h[1] == owner]:
                        del tracked[handle]
            elif self.users[node]:  # a node may have no users (fewer users than nodes)
                user = self.rng.choice(self.users[node])
                free = [t for t in TOPICS if (t, f"user-{user}", f"u{user}") not in tracked]
                if free:
                    await self._track(node, user, self.rng.choice(free))

    async def churn_all(self, nodes: Sequence[str], operations: int) -> None:
        share = max(1, operations // len(nodes))
        await asyncio.gather(*(self.churn(node, share) for node in nodes))

    def forget(self, node: str) -> None:
        """The node died: nothing is tracked there any more."""
        self.tracked[node] = {}

    def expected(self, visible_from: Sequence[str]) -> set[PresenceKey]:
        """What a node that can reach exactly ``visible_from`` (itself included) must list."""
        return {(topic, key, owner, ref)
                for node in visible_from
                for (topic, owner, key), ref in self.tracked[node].items()}


class Demo:
    def __init__(self, options: DemoOptions, out: TextIO) -> None:
        self.options = options
        self.out = out
        seed = options.seed if options.seed is not None else random.randrange(1_000_000)
        self.seed = seed
        self.rng = random.Random(seed)
        self.results: list[PhaseResult] = []

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def run(self, cluster: Cluster) -> list[PhaseResult]:
        options = self.options
        t = options.timing
        work = Workload(cluster, options.users, self.rng)
        n1, n2, n3 = NODES
        everyone = list(NODES)

        self.say(f"Presence demo: nodes {', '.join(NODES)} as separate processes on {HOST}; "
                 f"seed {self.seed}")
        self.say(f"periods: broadcast {t.broadcast_ms} ms, idle heartbeat every "
                 f"{t.max_silent} ticks, down after {t.down_ms} ms, "
                 f"permdown after {t.permdown_ms} ms")
        self.say("Converged = every live node lists exactly the presences tracked on the nodes "
                 "it can reach.")
        self.say("A user is present in one or two rooms; the tables count presences per room.")

        self.header(f"1. {options.users} users join from all nodes, then "
                    f"{options.churn} churn operations")
        await asyncio.gather(*(work.join(node) for node in everyone))
        await work.churn_all(everyone, options.churn)
        await self.check("1 join + churn", cluster, {n: work.expected(everyone) for n in everyone})

        self.header(f"2. {n3} is killed (SIGKILL); {n1} and {n2} must drop its users "
                    f"after {t.down_ms} ms of silence")
        await cluster.kill(n3)
        killed_at = time.monotonic()
        work.forget(n3)
        survivors = [n1, n2]
        await self.check(f"2 kill {n3}", cluster,
                         {n: work.expected(survivors) for n in survivors}, started=killed_at)

        self.header(f"3. {n3} restarts as a new incarnation and its users join again")
        await cluster.restart(n3)
        await work.join(n3)
        await self.check(f"3 restart {n3}", cluster,
                         {n: work.expected(everyone) for n in everyone})

        self.header(f"4. netsplit {n1} | {n2} {n3}: both sides churn for longer than the down "
                    f"period, then the split heals")
        await cluster.split([n1])
        split_at = time.monotonic()
        await asyncio.gather(work.churn(n1, options.churn // 3),
                             work.churn_all([n2, n3], options.churn * 2 // 3))
        sides = {n1: work.expected([n1]), n2: work.expected([n2, n3]),
                 n3: work.expected([n2, n3])}
        await self.check("4a split: each side alone", cluster, sides, started=split_at)
        # More churn while split, so the heal must also carry changes made during the split.
        await asyncio.gather(work.churn(n1, options.churn // 3),
                             work.churn_all([n2, n3], options.churn * 2 // 3))
        held = time.monotonic() - split_at
        await cluster.heal()
        self.say(f"split held {held:.1f} s, healed")
        await self.check("4b heal", cluster, {n: work.expected(everyone) for n in everyone})
        return self.results

    def header(self, text: str) -> None:
        self.say()
        self.say(f"== {text}")

    async def check(self, title: str, cluster: Cluster, expected: dict[str, set[PresenceKey]],
                    started: float | None = None) -> None:
        outcome = await cluster.wait_for(expected, self.options.timeout, started=started)
        cluster.record("phase", title=title, converged=outcome.converged,
                       seconds=round(outcome.seconds, 4))
        if outcome.converged:
            self.say(f"converged in {outcome.seconds:.2f} s")
        else:
            problems = ", ".join(
                f"{n}: {outcome.missing[n]} missing, {outcome.ghosts[n]} ghosts"
                for n in expected if outcome.missing[n] or outcome.ghosts[n])
            self.say(f"NOT converged after {outcome.seconds:.2f} s ({problems})")
        await self.print_topics(cluster)
        totals: dict[str, int | None] = {n: outcome.totals.get(n) for n in cluster.nodes}
        self.results.append(PhaseResult(title, outcome, totals))

    async def print_topics(self, cluster: Cluster) -> None:
        short = [topic.split(":", 1)[-1] for topic in TOPICS]
        rows = [["node", *short, "total"]]
        for name, node in cluster.nodes.items():
            if not node.alive:
                rows.append([name, *("-" for _ in TOPICS), "down"])
                continue
            info = await cluster.call(name, "info")
            sizes = info["topics"]
            rows.append([name, *(str(sizes.get(topic, 0)) for topic in TOPICS),
                         str(info["total"])])
        self.table(rows)

    def table(self, rows: list[list[str]]) -> None:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
            self.say("  " + "  ".join(cells))

    def summary(self, elapsed: float) -> None:
        self.header("Summary")
        self.say("time = until every live node listed what it should; then presences per node")
        rows = [["phase", "result", "time", *NODES]]
        for result in self.results:
            outcome = result.outcome
            rows.append([
                result.title,
                "converged" if outcome.converged else "FAILED",
                f"{outcome.seconds:.2f} s",
                *("-" if result.totals.get(n) is None else str(result.totals[n]) for n in NODES),
            ])
        self.table(rows)
        failed = [r.title for r in self.results if not r.outcome.converged]
        if failed:
            self.say(f"{len(failed)} phase(s) did not converge: {', '.join(failed)}")
        else:
            self.say(f"all {len(self.results)} checks converged (phase 4 is checked during the "
                     f"split and after the heal); demo took {elapsed:.1f} s")


async def run(options: DemoOptions, out: TextIO = sys.stdout) -> tuple[bool, list[PhaseResult]]:
    """Run the whole demo; returns whether every phase converged, and the phase results."""
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="presence-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(options, out)
    started = time.monotonic()
    ok = False
    history = options.history.open("w") if options.history is not None else None
    try:
        async with Cluster(NODES, options.timing, log_dir, history=history) as cluster:
            results = await demo.run(cluster)
            demo.summary(time.monotonic() - started)
            ok = all(r.outcome.converged for r in results)
            if options.keep_running:
                demo.say()
                demo.say("The cluster keeps running until Ctrl-C. Control endpoints "
                         "(JSON lines, e.g. {\"op\": \"list\"}):")
                for name, node in cluster.nodes.items():
                    demo.say(f"  {name}: {format_address(node.control)}   "
                             f"log: {node.log_path}")
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    # Ctrl-C is how a kept-running demo ends: not an error. (The outermost
                    # task, so nothing above it waits for the cancellation.)
                    demo.say("stopping the cluster")
    finally:
        if history is not None:
            history.close()
        if ok and not options.keep_running and options.log_dir is None:
            shutil.rmtree(log_dir, ignore_errors=True)
        elif not ok:
            demo.say(f"node logs: {log_dir}")
    return ok, demo.results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=positive_int, default=DEFAULTS.users,
                        help="simulated users, spread over the nodes (default: %(default)s)")
    parser.add_argument("--churn", type=positive_int, default=DEFAULTS.churn,
                        help="churn operations per phase (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="seed of the churn (default: random)")
    parser.add_argument("--timeout", type=float, default=DEFAULTS.timeout,
                        help="seconds each phase may take to converge (default: %(default)s)")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the cluster up after the demo, until Ctrl-C")
    parser.add_argument("--log-dir", type=Path,
                        help="where the nodes write their logs (default: a temporary directory, "
                             "removed after a successful run)")
    parser.add_argument("--history", type=Path, metavar="FILE",
                        help="write every operation, event and check as JSON lines to FILE")
    add_period_flags(parser, Config(
        broadcast_period_ms=DEMO_TIMING.broadcast_ms, max_silent_periods=DEMO_TIMING.max_silent,
        down_period_ms=DEMO_TIMING.down_ms, permdown_period_ms=DEMO_TIMING.permdown_ms,
        clock_sample_periods=DEMO_TIMING.clock_sample_periods), down_default=DEMO_TIMING.down_ms)
    parser.set_defaults(reconnect_max_ms=DEMO_TIMING.reconnect_max_ms)


def main(args: argparse.Namespace) -> int:
    timing = Timing(broadcast_ms=args.broadcast_ms, max_silent=args.max_silent,
                    down_ms=args.down_ms, permdown_ms=args.permdown_ms,
                    clock_sample_periods=args.clock_sample_periods,
                    reconnect_max_ms=args.reconnect_max_ms)
    try:
        timing.config()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UsageError("--timeout must be positive and finite")
    options = DemoOptions(users=args.users, churn=args.churn, seed=args.seed, timing=timing,
                          timeout=args.timeout, keep_running=args.keep_running,
                          log_dir=args.log_dir, history=args.history)
    try:
        ok, _ = asyncio.run(_run_until_signalled(options))
    except (ClusterError, ControlError, OSError) as exc:
        print(f"presence: error: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("presence: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0 if ok else 1


async def _run_until_signalled(options: DemoOptions) -> tuple[bool, list[PhaseResult]]:
    # SIGTERM cancels the demo like Ctrl-C does, so the node processes are still cleaned up.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(options)
