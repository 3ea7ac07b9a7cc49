"""Real asyncio ``Node``s on loopback TCP, driven in step with the model that predicts them.

``RuntimeCluster`` owns a few in-process nodes (each listening on an OS-chosen port of 127.0.0.1)
and, beside them, one ``presence_model.cluster.Cluster`` per shard. Every local operation is
applied to both: the node returns a ref or raises, the model does the same, and the two must agree
at once. Network faults exist only on the runtime side (the model clusters never deliver a
message): they only decide which node can reach which when the expected views are built.

What is checked:

* after every step, for every running node, that the diffs it reported through ``on_diff``, applied
  in order to the empty view it started from, give its current ``observe()`` (spec DF1), each diff
  being a real change (no join of a visible presence, no leave of an invisible one, no presence in
  both lists);
* on ``settle``, polling until a timeout, that every running node lists exactly the live local
  presences (model ``expected_view``) of itself and of every running node it has a link with, and
  sees exactly the current incarnations of those nodes as ``up`` (spec IN1, restricted to the
  reachable nodes while links are cut);
* on ``check_subscriptions``, at a quiet moment, that what a ``subscribe()`` iterator yielded is
  the same sequence of diffs.

A link between two nodes is cut when either end has cut the other (``Node.cut`` drops frames in
both directions at the node that cuts). Cuts belong to the network, not to a node: a node restarted
as a new incarnation gets the cuts of its predecessor again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import presence_model.cluster as mc
import presence_model.protocol as mp
import presence_model.state as ms
from presence.core.config import Config
from presence.core.types import AlreadyTracked, Diff, NotTracked, ReplicaId, Status
from presence.runtime.node import Node, shard_index
from presence.runtime.transport import Address, Backoff
from tests.support.observation import Observed, observed_impl, observed_model

HOST = "127.0.0.1"
QUICK_BACKOFF = Backoff(initial=0.02, maximum=0.2)
"""Redial a restarted or healed peer within 0.2 s instead of the default 5 s."""
STOP_TIMEOUT = 10.0
"""``Node.stop()`` closes sockets and cancels tasks: it has no reason to take seconds."""

Outcome = tuple[str, object]
"""What a local operation gave: ``("ref", ref)``, ``("removed", count)`` or ``("error", kind)``."""


class Disagreement(AssertionError):
    """The runtime did not do what the model predicts."""


@dataclass
class Incarnation:
    """One start of a node, with every diff it reported since before it started."""

    node: Node
    callback_diffs: list[Diff]
    subscription_diffs: list[Diff]
    consumer: asyncio.Task[None]


def apply_diffs(diffs: Iterable[Diff]) -> tuple[set[Observed], list[str]]:
    """Apply diffs in order to the empty view (spec DF1); return the view and every diff that is
    not a change of the visible set."""
    view: set[Observed] = set()
    problems: list[str] = []
    for index, diff in enumerate(diffs):
        joins, leaves = observed_impl(diff.joins), observed_impl(diff.leaves)
        join_set, leave_set = set(joins), set(leaves)
        if len(join_set) != len(joins) or len(leave_set) != len(leaves):
            problems.append(f"diff #{index} repeats a presence: {diff}")
        if join_set & leave_set:
            problems.append(f"diff #{index} both joins and leaves {sorted(join_set & leave_set)}")
        if leave_set - view:
            problems.append(f"diff #{index} leaves presences not visible: "
                            f"{sorted(leave_set - view)}")
        view -= leave_set
        if join_set & view:
            problems.append(f"diff #{index} joins presences already visible: "
                            f"{sorted(join_set & view)}")
        view |= join_set
    return view, problems


async def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` every 10 ms until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _outcome_of(call: Callable[[], Any], errors: Mapping[type[Exception], str]) -> Outcome:
    try:
        result = call()
    except tuple(errors) as exc:
        return ("error", errors[type(exc)])
    return ("ref", result) if isinstance(result, str) else ("removed", result)


class RuntimeCluster:
    def __init__(self, names: Iterable[str], config: Config, pool_size: int = 1,
                 settle_timeout: float = 15.0) -> None:
        self.names = sorted(names)
        self.config = config
        self.pool_size = pool_size
        self.settle_timeout = settle_timeout
        model_config = mp.Config(
            broadcast_period=config.broadcast_period_ms,
            max_silent_periods=config.max_silent_periods,
            down_period=config.down_ms,
            permdown_period=config.permdown_period_ms,
            clock_sample_periods=config.clock_sample_periods,
        )
        self.models = [mc.new_cluster(self.names, model_config) for _ in range(pool_size)]
        """One model cluster per shard: each shard of a node is a replica of its own."""
        self.addresses: dict[str, Address] = {}
        self.incarnations: dict[str, Incarnation] = {}
        """The latest incarnation of every node, running or stopped."""
        self.cuts: set[tuple[str, str]] = set()
        """``(at, peer)``: ``at`` has cut ``peer``."""
        self._baseline_tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> frozenset[str]:
        return self.models[0].running

    def vsn(self, name: str) -> int:
        return dict(self.models[0].incarnation)[name]

    async def start(self) -> None:
        self._baseline_tasks = asyncio.all_tasks()
        for name in self.names:
            await self._launch(name, (HOST, 0))
        for name, incarnation in self.incarnations.items():
            for peer in self.names:
                if peer != name:
                    incarnation.node.add_peer(self.addresses[peer], peer)

    async def _launch(self, name: str, listen: Address) -> Node:
        peers = [address for peer, address in self.addresses.items() if peer != name]
        node = Node(name, listen=listen, peers=peers,
                    peer_names={address: peer for peer, address in self.addresses.items()},
                    config=self.config, pool_size=self.pool_size, vsn=self.vsn(name),
                    backoff=QUICK_BACKOFF, flush_timeout=0.5)
        callback_diffs: list[Diff] = []
        node.on_diff(callback_diffs.append)
        subscription = node.subscribe()
        subscription_diffs: list[Diff] = []

        async def consume() -> None:
            async for diff in subscription:
                subscription_diffs.append(diff)

        consumer = asyncio.create_task(consume(), name=f"diffs of {name}.{self.vsn(name)}")
        self.incarnations[name] = Incarnation(node, callback_diffs, subscription_diffs, consumer)
        node.cut(peer for at, peer in self.cuts if at == name)
        await node.start()
        self.addresses[name] = node.address
        return node

    async def stop(self, name: str, graceful: bool) -> None:
        node = self.incarnations[name].node
        try:
            await asyncio.wait_for(node.stop(graceful=graceful), STOP_TIMEOUT)
        except TimeoutError:
            pending = sorted(t.get_name() for t in asyncio.all_tasks() if not t.done())
            raise Disagreement(
                f"{name}.stop(graceful={graceful}) did not return within {STOP_TIMEOUT} s; "
                f"tasks still pending: {pending}"
            ) from None
        self.models = [mc.stop(model, name, graceful)[0] for model in self.models]

    async def restart(self, name: str) -> None:
        """A new incarnation on the same port when it is still free, else on a new one that every
        other node is told to dial."""
        self.models = [mc.restart(model, name) for model in self.models]
        old = self.addresses[name]
        try:
            await self._launch(name, old)
        except OSError:
            self.incarnations[name].consumer.cancel()
            await self._launch(name, (HOST, 0))
            for peer, incarnation in self.incarnations.items():
                if peer != name:
                    incarnation.node.add_peer(self.addresses[name], name)

    async def close(self) -> list[str]:
        """Stop every node (not gracefully) and every diff consumer, then cancel whatever task
        is left (repeatedly: a cancellation can be lost, see ``stop``); never raises. Returns what
        went wrong: a ``stop`` that did not return, tasks that outlived the nodes."""
        problems: list[str] = []
        for name, incarnation in self.incarnations.items():
            try:
                await asyncio.wait_for(incarnation.node.stop(graceful=False), STOP_TIMEOUT)
            except TimeoutError:
                problems.append(f"{name}.stop(graceful=False) did not return within "
                                f"{STOP_TIMEOUT} s at teardown")
            except Exception as exc:
                problems.append(f"{name}.stop(graceful=False) failed at teardown: {exc!r}")
            incarnation.consumer.cancel()
        await asyncio.gather(*(i.consumer for i in self.incarnations.values()),
                             return_exceptions=True)
        leftovers = self._leftover_tasks()
        if leftovers:
            problems.append("tasks still running after every node stopped: "
                            f"{sorted(task.get_name() for task in leftovers)}")
        for _ in range(50):
            if not leftovers:
                break
            for task in leftovers:
                task.cancel()
            await asyncio.wait(leftovers, timeout=0.1)
            leftovers = self._leftover_tasks()
        return problems

    def _leftover_tasks(self) -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks()
                if task not in self._baseline_tasks and not task.done()]

    def node(self, name: str) -> Node:
        return self.incarnations[name].node

    # --- local operations: the runtime and the model side by side -------------------------------

    def _local(self, name: str, what: str, impl: Callable[[], Any],
               model: Callable[[mc.Cluster], tuple[mc.Cluster, mc.Step]],
               shards: Iterable[int]) -> Outcome:
        expected: Outcome
        try:
            models = list(self.models)
            removed = 0
            for index in shards:
                models[index], step = model(models[index])
                [(_, diff)] = step.diffs
                removed += len(diff.leaves)
                joined = diff.joins
            expected = (("ref", _ref(joined[0])) if what in ("track", "update")
                        else ("removed", removed))
            self.models = models
        except ms.AlreadyTracked:
            expected = ("error", "already tracked")
        except ms.NotTracked:
            expected = ("error", "not tracked")
        actual = _outcome_of(impl, {AlreadyTracked: "already tracked", NotTracked: "not tracked"})
        if what == "untrack" and actual[0] == "removed":
            actual = ("removed", int(bool(actual[1])))  # untrack says whether it removed one
        if actual != expected:
            raise Disagreement(f"{what} at {name}: the node gave {actual}, the model {expected}")
        return actual

    def track(self, name: str, owner: str, topic: str, key: str,
              meta: Mapping[str, Any]) -> Outcome:
        return self._local(
            name, "track", lambda: self.node(name).track(owner, topic, key, meta),
            lambda m: mc.local(m, name, ms.track, owner, topic, key, dict(meta)),
            [self._shard(topic)])

    def update(self, name: str, owner: str, topic: str, key: str,
               meta: Mapping[str, Any]) -> Outcome:
        return self._local(
            name, "update", lambda: self.node(name).update(owner, topic, key, meta),
            lambda m: mc.local(m, name, ms.update, owner, topic, key, dict(meta)),
            [self._shard(topic)])

    def untrack(self, name: str, owner: str, topic: str, key: str) -> Outcome:
        return self._local(
            name, "untrack", lambda: self.node(name).untrack(owner, topic, key),
            lambda m: mc.local(m, name, ms.untrack, owner, topic, key),
            [self._shard(topic)])

    def untrack_owner(self, name: str, owner: str) -> Outcome:
        return self._local(
            name, "untrack_owner", lambda: self.node(name).untrack_owner(owner),
            lambda m: mc.local(m, name, ms.untrack_owner, owner),
            range(self.pool_size))

    def _shard(self, topic: str) -> int:
        return shard_index(topic, self.pool_size)

    # --- links ----------------------------------------------------------------------------------

    def cut(self, at: str, peers: Iterable[str]) -> None:
        peers = [peer for peer in peers if peer != at]
        self.cuts.update((at, peer) for peer in peers)
        if at in self.running:
            self.node(at).cut(peers)

    def heal(self, at: str, peers: Iterable[str]) -> None:
        peers = list(peers)
        self.cuts.difference_update((at, peer) for peer in peers)
        if at in self.running:
            self.node(at).heal(peers)

    def heal_all(self) -> None:
        for at in self.names:
            self.heal(at, self.names)

    def linked(self, a: str, b: str) -> bool:
        return (a, b) not in self.cuts and (b, a) not in self.cuts

    def reachable(self, name: str) -> list[str]:
        """The running nodes ``name`` has a link with, itself included."""
        return sorted(n for n in self.running if n == name or self.linked(name, n))

    # --- expectations ---------------------------------------------------------------------------

    def expected_view(self, name: str) -> list[Observed]:
        """IN1: the live local presences of every running node ``name`` can reach, by the model."""
        reach = frozenset(self.reachable(name))
        return sorted(
            presence
            for model in self.models
            for presence in observed_model(mc.expected_view(replace(model, running=reach)))
        )

    def expected_up(self, name: str) -> set[ReplicaId]:
        return {ReplicaId(n, self.vsn(n)) for n in self.reachable(name) if n != name}

    def actual_view(self, name: str) -> list[Observed]:
        return observed_impl(self.node(name).observe())

    def actual_up(self, name: str) -> set[ReplicaId]:
        return {r for r, status in self.node(name).peers().items() if status is Status.UP}

    def converged(self) -> bool:
        return all(
            self.actual_view(name) == self.expected_view(name)
            and self.actual_up(name) == self.expected_up(name)
            for name in self.running
        )

    async def settle(self) -> None:
        """Wait until every running node sees what the model predicts for its reachable nodes."""
        if not await eventually(self.converged, self.settle_timeout):
            raise Disagreement(
                f"no convergence within {self.settle_timeout} s\n{self.describe()}"
            )

    def check_callback_diffs(self) -> None:
        """DF1 at this moment, for every running node: exact, since a node changes its state and
        calls ``on_diff`` within one callback of the event loop."""
        for name in sorted(self.running):
            incarnation = self.incarnations[name]
            applied, problems = apply_diffs(incarnation.callback_diffs)
            actual = set(self.actual_view(name))
            if problems or applied != actual:
                raise Disagreement(
                    f"DF1 at {name}.{self.vsn(name)}: its diffs do not give its view\n"
                    + "".join(f"  {problem}\n" for problem in problems)
                    + _difference("  diffs applied", "view", sorted(applied), sorted(actual))
                    + f"  diffs: {incarnation.callback_diffs}"
                )

    async def check_subscriptions(self) -> None:
        """At a quiet moment: each running node's ``subscribe()`` iterator yielded exactly the
        diffs its ``on_diff`` callback got, in the same order."""
        def caught_up() -> bool:
            return all(len(i.subscription_diffs) >= len(i.callback_diffs)
                       for n, i in self.incarnations.items() if n in self.running)

        await eventually(caught_up, self.settle_timeout)
        for name in sorted(self.running):
            incarnation = self.incarnations[name]
            if incarnation.subscription_diffs != incarnation.callback_diffs:
                raise Disagreement(
                    f"the subscription of {name} yielded other diffs than on_diff got:\n"
                    f"  subscribe(): {incarnation.subscription_diffs}\n"
                    f"  on_diff:     {incarnation.callback_diffs}"
                )

    def describe(self) -> str:
        """Every node's view and peers beside what the model expects, for failure reports."""
        lines = [f"cut links (at, peer): {sorted(self.cuts) or 'none'}"]
        for name in self.names:
            node = self.node(name)
            if name not in self.running:
                lines.append(f"node {name}.{self.vsn(name)}: stopped")
                continue
            view, expected = self.actual_view(name), self.expected_view(name)
            up, expected_up = self.actual_up(name), self.expected_up(name)
            lines.append(
                f"node {name}.{self.vsn(name)} at port {node.address[1]}: reaches "
                f"{self.reachable(name)}; sends to {node.transport.connected()}, "
                f"accepted from {node.transport.inbound()}"
            )
            lines.append(f"  peers: {_peers(node.peers())}"
                         + ("" if up == expected_up else f" (expected up: {_peers(expected_up)})"))
            if view == expected:
                lines.append(f"  view as expected: {len(view)} presences")
            else:
                lines.append(_difference("  view", "expected", view, expected).rstrip("\n"))
        return "\n".join(lines)


def _ref(presence: ms.Presence) -> str:
    return str(json.loads(presence.meta)["phx_ref"])


def _peers(peers: Mapping[ReplicaId, Status] | Iterable[ReplicaId]) -> str:
    if isinstance(peers, Mapping):
        return ", ".join(f"{r.name}.{r.vsn}={s.value}" for r, s in peers.items()) or "none"
    return ", ".join(f"{r.name}.{r.vsn}" for r in sorted(peers)) or "none"


def _difference(left_name: str, right_name: str, left: list[Observed],
                right: list[Observed]) -> str:
    missing = sorted(set(right) - set(left))
    extra = sorted(set(left) - set(right))
    text = f"{left_name} ({len(left)}) != {right_name} ({len(right)})\n"
    text += "".join(f"    missing   {p}\n" for p in missing)
    text += "".join(f"    unexpected {p}\n" for p in extra)
    return text
