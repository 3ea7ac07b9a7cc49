"""Randomized scenarios through the real asyncio runtime, checked against the model.

Hypothesis rules cannot be async, so Hypothesis only *generates* a scenario, a list of steps; each
example then runs it in one ``asyncio.run`` on 3 or 4 in-process ``Node``s over real TCP on
127.0.0.1 (ports chosen by the OS), with a 50 ms broadcast period, a 500 ms down period, a
permanent-down period of 1.5 s or 60 s, and one or two shards. The model side is
``tests.support.runtime_cluster``: one ``presence_model.cluster`` per shard, fed the same local
operations, gives every expected view.

Steps: track, update, untrack and owner exits on any running node (the model predicts every ref
and every error at once); pauses that let gossip interleave with the churn; link cuts at one end or
at both (partial partitions, where a node may reach a peer that another cannot) and heals of single
links; crashes (a stop without the graceful permdown), graceful stops, and restarts as a new
incarnation. ``settle`` waits, links left as they are, until every node lists exactly the live
local presences of the running nodes it has a link with, as the model computes them; ``heal all``
heals every link and waits the same way, and also checks the ``subscribe()`` streams. Every
scenario ends with ``heal all``. After every step, every running node's diffs applied in order to
its initial view must give its current view (DF1). Every ``stop`` must return, and no task may
outlive the nodes once they are all stopped.

Shrinking is off (``PRESENCE_RUNTIME_FUZZ_SHRINK=1`` turns it on): an example takes up to seconds
and its outcome may depend on timing. A failure prints the whole scenario, the step that failed,
and each node's view and peers beside the model's. More examples:
``PRESENCE_RUNTIME_FUZZ_EXAMPLES=300 .venv/bin/python -m pytest tests/e2e/test_runtime_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from presence.core.config import Config
from tests.support.runtime_cluster import RuntimeCluster

pytestmark = pytest.mark.e2e

NAMES = ("a", "b", "c", "d")
TOPICS = ("room", "game", "lobby")
"""With two shards, "game" goes to shard 0 and the others to shard 1."""
KEYS = ("k1", "k2")
OWNERS_PER_NODE = 2
EXAMPLES = int(os.environ.get("PRESENCE_RUNTIME_FUZZ_EXAMPLES", "15"))
SHRINK = os.environ.get("PRESENCE_RUNTIME_FUZZ_SHRINK") == "1"
SCENARIO_TIMEOUT = 120.0


# --- steps --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Track:
    node: str
    owner: str
    topic: str
    key: str
    meta: dict[str, Any] = field(hash=False)

    def __str__(self) -> str:
        return f"{self.node}: track {self.owner} {self.topic}/{self.key} {self.meta}"


@dataclass(frozen=True)
class Update:
    node: str
    owner: str
    topic: str
    key: str
    meta: dict[str, Any] = field(hash=False)

    def __str__(self) -> str:
        return f"{self.node}: update {self.owner} {self.topic}/{self.key} {self.meta}"


@dataclass(frozen=True)
class Untrack:
    node: str
    owner: str
    topic: str
    key: str

    def __str__(self) -> str:
        return f"{self.node}: untrack {self.owner} {self.topic}/{self.key}"


@dataclass(frozen=True)
class OwnerExit:
    node: str
    owner: str

    def __str__(self) -> str:
        return f"{self.node}: owner {self.owner} exits (untrack_owner)"


@dataclass(frozen=True)
class Pause:
    ms: int

    def __str__(self) -> str:
        return f"pause {self.ms} ms"


@dataclass(frozen=True)
class Cut:
    """``at`` cuts its links to ``peers`` (frames both ways dropped at ``at`` only)."""

    at: str
    peers: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.at}: cut {', '.join(self.peers)}"


@dataclass(frozen=True)
class Partition:
    """Both ends cut every link between the two sides (on top of the cuts already there)."""

    side: tuple[str, ...]
    other: tuple[str, ...]

    def __str__(self) -> str:
        return f"partition {''.join(self.side)} | {''.join(self.other)}"


@dataclass(frozen=True)
class Heal:
    at: str
    peers: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.at}: heal {', '.join(self.peers)}"


@dataclass(frozen=True)
class Settle:
    def __str__(self) -> str:
        return "settle (links as they are) and check every view"


@dataclass(frozen=True)
class HealAll:
    def __str__(self) -> str:
        return "heal all, settle and check every view and subscription"


@dataclass(frozen=True)
class Stop:
    node: str
    graceful: bool

    def __str__(self) -> str:
        return f"{self.node}: {'graceful stop' if self.graceful else 'crash'}"


@dataclass(frozen=True)
class Restart:
    node: str

    def __str__(self) -> str:
        return f"{self.node}: restart as a new incarnation"


Step = (Track | Update | Untrack | OwnerExit | Pause | Cut | Partition | Heal | Settle | HealAll
        | Stop | Restart)


@dataclass(frozen=True)
class Scenario:
    names: tuple[str, ...]
    pool_size: int
    permdown_ms: int
    steps: tuple[Step, ...]

    def config(self) -> Config:
        return Config(broadcast_period_ms=50, max_silent_periods=4, down_period_ms=500,
                      permdown_period_ms=self.permdown_ms)

    def describe(self, failed_at: int | None = None) -> str:
        lines = [f"scenario: nodes {', '.join(self.names)}, pool_size {self.pool_size}, "
                 f"{self.config()}"]
        for index, step in enumerate(self.steps):
            marker = ">>" if index == failed_at else "  "
            lines.append(f"{marker}{index + 1:3}. {step}")
        return "\n".join(lines)


# --- generation ---------------------------------------------------------------------------------

Handle = tuple[str, str, str]
METAS = st.one_of(
    st.just({}),
    st.builds(lambda n: {"n": n}, st.integers(0, 99)),
    st.just({"status": "away", "tags": ["é", 1, None]}),
    st.just({"phx_ref": "forged", "phx_ref_prev": "forged", "s": "x"}),  # refs never kept (ID4)
)


def owners(node: str) -> list[str]:
    return [f"{node}-o{i}" for i in range(1, OWNERS_PER_NODE + 1)]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """A scenario of valid steps: operations only on running nodes, restarts only of stopped
    ones, and at least one node running. ``tracked`` guesses which handles exist, so that updates
    and untracks mostly hit one; the model, not this guess, decides what must happen."""
    names = NAMES[: draw(st.integers(3, 4))]
    running = set(names)
    tracked: dict[str, set[Handle]] = {name: set() for name in names}
    steps: list[Step] = []

    def handle(node: str) -> Handle:
        return (draw(st.sampled_from(owners(node))), draw(st.sampled_from(TOPICS)),
                draw(st.sampled_from(KEYS)))

    def existing(node: str) -> Handle:
        if tracked[node] and draw(st.integers(0, 9)) > 0:
            return draw(st.sampled_from(sorted(tracked[node])))
        return handle(node)

    kinds = (["track"] * 5 + ["update"] * 2 + ["untrack"] * 2 + ["exit", "pause", "pause", "cut",
             "cut", "heal", "partition", "settle", "heal all", "crash", "stop", "restart"])
    for _ in range(draw(st.integers(10, 20))):
        kind = draw(st.sampled_from(kinds))
        up = sorted(running)
        if kind in ("track", "update", "untrack", "exit"):
            node = draw(st.sampled_from(up))
            if kind == "track":
                owner, topic, key = handle(node)
                steps.append(Track(node, owner, topic, key, draw(METAS)))
                tracked[node].add((owner, topic, key))
            elif kind == "update":
                owner, topic, key = existing(node)
                steps.append(Update(node, owner, topic, key, draw(METAS)))
            elif kind == "untrack":
                owner, topic, key = existing(node)
                steps.append(Untrack(node, owner, topic, key))
                tracked[node].discard((owner, topic, key))
            else:
                owner = draw(st.sampled_from(owners(node)))
                steps.append(OwnerExit(node, owner))
                tracked[node] = {h for h in tracked[node] if h[0] != owner}
        elif kind == "pause":
            steps.append(Pause(draw(st.sampled_from([0, 20, 100, 300]))))
        elif kind in ("cut", "heal"):
            at = draw(st.sampled_from(names))
            others = [n for n in names if n != at]
            peers = draw(st.lists(st.sampled_from(others), min_size=1, unique=True))
            steps.append((Cut if kind == "cut" else Heal)(at, tuple(sorted(peers))))
        elif kind == "partition":
            side = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names) - 1,
                                 unique=True))
            steps.append(Partition(tuple(sorted(side)),
                                   tuple(n for n in names if n not in side)))
        elif kind == "settle":
            steps.append(Settle())
        elif kind == "heal all":
            steps.append(HealAll())
        elif kind in ("crash", "stop") and len(running) > 1:
            node = draw(st.sampled_from(up))
            steps.append(Stop(node, graceful=kind == "stop"))
            running.discard(node)
            tracked[node] = set()
        elif kind == "restart" and len(running) < len(names):
            node = draw(st.sampled_from(sorted(set(names) - running)))
            steps.append(Restart(node))
            running.add(node)
    steps.append(HealAll())
    return Scenario(
        names=names,
        pool_size=draw(st.sampled_from([1, 2])),
        permdown_ms=draw(st.sampled_from([1_500, 60_000])),
        steps=tuple(steps),
    )


# --- execution ----------------------------------------------------------------------------------


async def execute(cluster: RuntimeCluster, step: Step) -> None:
    match step:
        case Track(node, owner, topic, key, meta):
            cluster.track(node, owner, topic, key, meta)
        case Update(node, owner, topic, key, meta):
            cluster.update(node, owner, topic, key, meta)
        case Untrack(node, owner, topic, key):
            cluster.untrack(node, owner, topic, key)
        case OwnerExit(node, owner):
            cluster.untrack_owner(node, owner)
        case Pause(ms):
            await asyncio.sleep(ms / 1000)
        case Cut(at, peers):
            cluster.cut(at, peers)
        case Partition(side, other):
            for a in side:
                cluster.cut(a, other)
            for b in other:
                cluster.cut(b, side)
        case Heal(at, peers):
            cluster.heal(at, peers)
        case Settle():
            await cluster.settle()
        case HealAll():
            cluster.heal_all()
            await cluster.settle()
            await cluster.check_subscriptions()
        case Stop(node, graceful):
            await cluster.stop(node, graceful)
        case Restart(node):
            await cluster.restart(node)


async def run_scenario(scenario: Scenario) -> None:
    cluster = RuntimeCluster(scenario.names, scenario.config(), scenario.pool_size)
    current: int | None = None
    try:
        await cluster.start()
        for index, step in enumerate(scenario.steps):
            current = index
            await execute(cluster, step)
            cluster.check_callback_diffs()
    except BaseException as exc:
        exc.add_note(scenario.describe(failed_at=current))
        if not isinstance(exc, AssertionError):
            try:
                exc.add_note(cluster.describe())
            except Exception as error:
                exc.add_note(f"(the cluster could not be described: {error!r})")
        raise
    finally:
        problems = await cluster.close()
    if problems:
        raise AssertionError("\n".join([*problems, scenario.describe()]))


def run(scenario: Scenario) -> None:
    asyncio.run(asyncio.wait_for(run_scenario(scenario), SCENARIO_TIMEOUT))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
@given(scenarios())
def test_real_nodes_converge_to_the_models_view_through_churn_cuts_and_crashes(
        scenario: Scenario) -> None:
    run(scenario)


def _steps(*steps: Step) -> tuple[Step, ...]:
    return (*steps, HealAll())


def _example(steps: Iterable[Step], pool_size: int = 1, names: int = 3) -> Scenario:
    return Scenario(NAMES[:names], pool_size, 60_000, _steps(*steps))


def test_a_partial_partition_hides_only_the_unreachable_node() -> None:
    # a and b cannot talk, c reaches both: a must not see b's presence through c, and the reverse.
    run(_example([
        Track("a", "a-o1", "room", "k1", {}),
        Track("b", "b-o1", "room", "k1", {"n": 1}),
        Track("c", "c-o1", "game", "k2", {}),
        Settle(),
        Cut("a", ("b",)),
        Update("b", "b-o1", "room", "k1", {"n": 2}),
        Settle(),
        Untrack("c", "c-o1", "game", "k2"),
        Settle(),
    ], pool_size=2))


def test_a_crashed_node_restarted_during_a_netsplit_replaces_its_old_incarnation() -> None:
    run(_example([
        Track("a", "a-o1", "room", "k1", {}),
        Track("c", "c-o1", "room", "k1", {}),
        Settle(),
        Partition(("a",), ("b", "c")),
        Stop("c", graceful=False),
        Restart("c"),
        Track("c", "c-o1", "room", "k1", {"again": True}),
        Settle(),
    ]))
