"""Explore presence histories: run the model and the implementation side by side and look inside.

A history (format ``presence-history/1``, spec/vectors.md) is run step by step through the
executable model (``presence_model.history``) and through the implementation's sans-IO shards on
the in-memory cluster of ``tests/support`` (``tests.support.replay``). After every step both sides
are captured: the observation (what every node lists, its peer table, diffs, events, messages in
flight), each replica's stored entries, context and clock, and the payloads of the messages in
flight. The notebooks in this folder render those captures as tables and pictures.

Only the observation is normative (IN2): it is what ``check`` asserts. Stored states and message
contents are compared too and any difference is shown, but an implementation may legitimately
build a transfer differently (GP5).
"""

from __future__ import annotations

import html
import io
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

import presence_model.history as mh
from presence_model import cluster as mc
from presence_model import protocol as mp
from presence_model import state as ms

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "spec" / "vectors"
REGRESSIONS = ROOT / "tests" / "regressions"

if str(ROOT) not in sys.path:  # the implementation's test cluster lives in tests/support
    sys.path.insert(0, str(ROOT))

from tests.support import replay  # noqa: E402
from tests.support.impl_cluster import ImplCluster  # noqa: E402

from presence.core import types as it  # noqa: E402

Json = Any
Step = dict[str, Any]

CONFIG: dict[str, int] = {
    "broadcast_period": 100,
    "max_silent_periods": 3,
    "down_period": 500,
    "permdown_period": 1500,
    "clock_sample_periods": 2,
}
"""The timing options every conformance vector uses (spec/vectors.md section 7)."""


# --- loading and building histories -------------------------------------------------------------


def load(name: str | Path) -> Json:
    """A history by path, or by name from spec/vectors/ or tests/regressions/."""
    path = Path(name)
    if not path.suffix:
        candidates = [VECTORS / f"{name}.json", REGRESSIONS / f"{name}.json"]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(f"no history named {name!r} in {VECTORS} or {REGRESSIONS}")
        path = found[0]
    history: Json = json.loads(path.read_text(encoding="utf-8"))
    if history.get("format") != mh.FORMAT:
        raise ValueError(f"{path}: not a {mh.FORMAT} history")
    return history


def track(node: str, owner: str, topic: str, key: str, meta: Json | None = None) -> Step:
    """OP1."""
    return {"do": "track", "node": node, "owner": owner, "topic": topic, "key": key,
            "meta": meta if meta is not None else {}}


def untrack(node: str, owner: str, topic: str, key: str) -> Step:
    """OP2."""
    return {"do": "untrack", "node": node, "owner": owner, "topic": topic, "key": key}


def update(node: str, owner: str, topic: str, key: str, meta: Json) -> Step:
    """OP3."""
    return {"do": "update", "node": node, "owner": owner, "topic": topic, "key": key,
            "meta": meta}


def untrack_owner(node: str, owner: str) -> Step:
    """OP4."""
    return {"do": "untrack_owner", "node": node, "owner": owner}


def tick(*nodes: str) -> list[Step]:
    """One tick of each node, in the order given (GP2)."""
    return [{"do": "tick", "node": node} for node in nodes]


def advance(ms: int) -> Step:
    return {"do": "advance", "ms": ms}


def _find(do: str, source: str, destination: str, kind: str | None, sender: str | None,
          nth: int) -> Step:
    return {"do": do, "find": [source, destination, kind, sender], "nth": nth}


def deliver(source: str, destination: str, kind: str | None = None, *,
            sender: str | None = None, nth: int = 0) -> Step:
    """The ``nth`` message in flight from ``source`` to ``destination`` (of that kind, from that
    sender replica) is delivered. Resolved to an index by ``build``."""
    return _find("deliver", source, destination, kind, sender, nth)


def drop(source: str, destination: str, kind: str | None = None, *,
         sender: str | None = None, nth: int = 0) -> Step:
    """As ``deliver``, but the message is lost."""
    return _find("drop", source, destination, kind, sender, nth)


def flush(*, keep: Sequence[tuple[str, str, str]] = ()) -> Step:
    """Deliver the first message in flight until none is left, except those matching a ``keep``
    triple (source, destination, sender replica), which stay in flight."""
    return {"do": "flush", "keep": [list(held) for held in keep]}


def cut(*links: tuple[str, str]) -> Step:
    """The set of cut directed links becomes exactly these."""
    return {"do": "cut", "links": [list(link) for link in links]}


def split(side: Iterable[str], other: Iterable[str]) -> Step:
    """A netsplit: every link between the two sides cut, both ways."""
    ours, theirs = list(side), list(other)
    return cut(*[(x, y) for x in ours for y in theirs], *[(y, x) for x in ours for y in theirs])


def heal() -> Step:
    return {"do": "heal"}


def stop(node: str, *, graceful: bool) -> Step:
    """A crash (``graceful=False``) or a graceful shutdown (GP7)."""
    return {"do": "stop", "node": node, "graceful": graceful}


def restart(node: str) -> Step:
    """A new incarnation of a stopped node (ID1)."""
    return {"do": "restart", "node": node}


def meet(*nodes: str) -> list[Step]:
    """Every node ticks once (a first tick always broadcasts) and everything is delivered."""
    return [*tick(*nodes), flush()]


def rounds(count: int, *nodes: str, keep: Sequence[tuple[str, str, str]] = ()) -> list[Step]:
    """``count`` broadcast periods: time moves on, every node ticks, everything is delivered
    (except the messages ``keep`` holds back, as in ``flush``)."""
    steps: list[Step] = []
    for _ in range(count):
        steps += [advance(CONFIG["broadcast_period"]), *tick(*nodes), flush(keep=keep)]
    return steps


def build(name: str, nodes: Sequence[str], steps: Iterable[Step | list[Step]], *,
          description: str = "", config: dict[str, int] | None = None) -> Json:
    """A history from steps, with named messages and flushes resolved into plain ``deliver`` and
    ``drop`` steps by following the model's network, and ``expect`` filled in by the model."""
    history: Json = {
        "format": mh.FORMAT,
        "name": name,
        "description": description,
        "nodes": list(nodes),
        "config": dict(config or CONFIG),
    }
    cluster = mc.new_cluster(list(nodes), mh.config_of(history))
    resolved: list[Step] = []

    def perform(action: Step) -> None:
        nonlocal cluster
        cluster, _, _ = mh.apply(cluster, action)
        resolved.append(action)

    flat: list[Step] = []
    for item in steps:
        flat.extend(item if isinstance(item, list) else [item])
    for action in flat:
        if action["do"] == "flush":
            keep = {tuple(held) for held in action["keep"]}
            while True:
                movable = [i for i, (s, d, _, r) in enumerate(_in_flight_rows(cluster))
                           if (s, d, r) not in keep]
                if not movable:
                    break
                perform({"do": "deliver", "index": movable[0]})
        elif "find" in action:
            source, destination, kind, sender = action["find"]
            matches = [
                i
                for i, (s, d, k, r) in enumerate(_in_flight_rows(cluster))
                if (s, d) == (source, destination) and kind in (None, k) and sender in (None, r)
            ]
            if len(matches) <= action["nth"]:
                raise ValueError(f"no message {action['find']} in flight at step {len(resolved)}")
            perform({"do": action["do"], "index": matches[action["nth"]]})
        else:
            perform(action)
    history["steps"] = resolved
    history["expect"] = mh.run(history)
    return history


def _in_flight_rows(cluster: mc.Cluster) -> list[list[str]]:
    return list(mh.observation(cluster, mc.Step(), None)["in_flight"])


# --- what is captured after every step ----------------------------------------------------------


@dataclass(frozen=True, order=True)
class EntryView:
    """A stored entry: its dot (which is also its ref, ID4) and its handle and meta."""

    replica: str
    n: int
    topic: str
    owner: str
    key: str
    meta: str  # canonical JSON

    @property
    def dot(self) -> str:
        return f"{self.replica}.{self.n}"

    def text(self) -> str:
        return f"{self.dot} {self.key} [{self.owner}]{_meta_text(json.loads(self.meta))}"


@dataclass(frozen=True)
class PayloadView:
    """A delta or a full state (section 4): entries and the dots they are judged against."""

    entries: tuple[EntryView, ...]
    context: tuple[tuple[str, tuple[int, ...]], ...]  # replica -> sorted counters

    def text(self) -> str:
        entries = ", ".join(e.text() for e in self.entries) or "none"
        return f"entries: {entries}; context: {context_text(self.context)}"


@dataclass(frozen=True)
class ReplicaView:
    """What one node stores: entries (visible or hidden), context and clock (ST1, ST3)."""

    entries: tuple[EntryView, ...]
    context: tuple[tuple[str, tuple[int, ...]], ...]
    clock: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class MessageView:
    """A message in flight, with its content (GP1)."""

    source: str
    destination: str
    kind: str
    sender: str
    clock: tuple[tuple[str, int], ...] | None
    payload: PayloadView | None

    def text(self) -> str:
        parts = [f"{self.source}→{self.destination} {self.kind} from {self.sender}"]
        if self.clock is not None:
            parts.append("clock {" + ", ".join(f"{r}: {n}" for r, n in self.clock) + "}")
        if self.payload is not None:
            label = "delta" if self.kind == "heartbeat" else "payload"
            parts.append(f"{label}: {self.payload.text()}")
        elif self.kind == "heartbeat":
            parts.append("no delta")
        return "; ".join(parts)


@dataclass(frozen=True)
class Capture:
    """One side after one step."""

    observation: Json
    replicas: dict[str, ReplicaView]
    messages: tuple[MessageView, ...]
    now: int
    cut: frozenset[tuple[str, str]]


def _name(replica: Any) -> str:
    return f"{replica[0]}.{replica[1]}"


def _context(pairs: Iterable[tuple[str, int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    table: dict[str, set[int]] = {}
    for replica, n in pairs:
        table.setdefault(replica, set()).add(n)
    return tuple(sorted((r, tuple(sorted(ns))) for r, ns in table.items()))


def _meta_json(meta: Any) -> str:
    return json.dumps(dict(meta), sort_keys=True, ensure_ascii=False)


def _model_payload(payload: ms.Payload) -> PayloadView:
    entries = tuple(sorted(
        EntryView(_name(e.dot.replica), e.dot.n, e.topic, e.owner, e.key,
                  _meta_json(json.loads(e.meta)))
        for e in payload.entries
    ))
    return PayloadView(entries, _context((_name(d.replica), d.n) for d in payload.context))


def _impl_payload(payload: it.Payload) -> PayloadView:
    entries = tuple(sorted(
        EntryView(_name(e.replica), e.counter, e.topic, e.owner, e.key, _meta_json(e.meta))
        for e in payload.entries
    ))
    dots = (
        (_name(replica), n)
        for replica, ranges in payload.context.items()
        for first, last in ranges
        for n in range(first, last + 1)
    )
    return PayloadView(entries, _context(dots))


def _clock(clock: Iterable[tuple[Any, int]]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((_name(r), n) for r, n in clock))


_MODEL_KINDS: dict[type, str] = {
    mp.Heartbeat: "heartbeat",
    mp.TransferReq: "transfer_req",
    mp.TransferAck: "transfer_ack",
    mp.GracefulPermdown: "graceful_permdown",
}
_IMPL_KINDS: dict[type, str] = {
    it.Heartbeat: "heartbeat",
    it.TransferRequest: "transfer_req",
    it.TransferAck: "transfer_ack",
    it.GracefulPermdown: "graceful_permdown",
}


def _capture_model(cluster: mc.Cluster, observation: Json) -> Capture:
    replicas = {}
    for name, node in cluster.nodes:
        stored = _model_payload(ms.full_state(node.replica, None))
        replicas[name] = ReplicaView(stored.entries, stored.context,
                                     _clock(ms.clock(node.replica).items()))
    messages = []
    for e in cluster.in_flight:
        message = e.message
        kind = _MODEL_KINDS[type(message)]
        clock = payload = None
        if isinstance(message, mp.Heartbeat | mp.TransferReq):
            clock = _clock(message.clock)
        if isinstance(message, mp.Heartbeat) and message.delta is not None:
            payload = _model_payload(message.delta)
        if isinstance(message, mp.TransferAck):
            payload = _model_payload(message.payload)
        messages.append(MessageView(e.source, e.destination, kind, _name(message.sender),
                                    clock, payload))
    return Capture(observation, replicas, tuple(messages), cluster.now, cluster.cut)


def _capture_impl(cluster: ImplCluster, observation: Json) -> Capture:
    replicas = {}
    for name, shard in cluster.shards.items():
        stored = _impl_payload(shard.state.full_state(None))
        replicas[name] = ReplicaView(stored.entries, stored.context,
                                     _clock(shard.state.clock().items()))
    messages = []
    for e in cluster.in_flight:
        message = e.message
        kind = _IMPL_KINDS[type(message)]
        clock = payload = None
        if isinstance(message, it.Heartbeat | it.TransferRequest):
            clock = _clock(message.clock.items())
        if isinstance(message, it.Heartbeat) and message.delta is not None:
            payload = _impl_payload(message.delta)
        if isinstance(message, it.TransferAck):
            payload = _impl_payload(message.payload)
        messages.append(MessageView(e.source, e.destination, kind, _name(message.sender),
                                    clock, payload))
    return Capture(observation, replicas, tuple(messages), cluster.now, cluster.cut)


# --- running both sides -------------------------------------------------------------------------


@dataclass
class SideBySide:
    """A history run through the model and the implementation, captured after every step."""

    history: Json
    model: list[Capture] = field(default_factory=list)
    impl: list[Capture] = field(default_factory=list)
    model_only: bool = False
    """True for a run of the model alone (a counterfactual): nothing is compared."""

    @property
    def steps(self) -> list[Step]:
        return list(self.history["steps"])

    @property
    def nodes(self) -> list[str]:
        return sorted(self.history["nodes"])

    def __len__(self) -> int:
        return len(self.model)

    # -- agreement --

    def observations_agree(self, i: int) -> bool:
        """IN2 at step ``i``: the two observations are equal as JSON values."""
        return self.model_only or bool(self.model[i].observation == self.impl[i].observation)

    def states_agree(self, i: int) -> bool:
        return self.model_only or self.model[i].replicas == self.impl[i].replicas

    def messages_agree(self, i: int) -> bool:
        return self.model_only or self.model[i].messages == self.impl[i].messages

    def expect_agrees(self) -> bool | None:
        """Whether the model still computes the file's recorded ``expect`` (None: no expect)."""
        if "expect" not in self.history:
            return None
        return bool([c.observation for c in self.model] == self.history["expect"])

    def disagreements(self) -> dict[str, list[int]]:
        """Steps where the two sides differ, by what differs."""
        return {
            "observation": [i for i in range(len(self)) if not self.observations_agree(i)],
            "stored state": [i for i in range(len(self)) if not self.states_agree(i)],
            "messages": [i for i in range(len(self)) if not self.messages_agree(i)],
        }

    def agreement(self) -> str:
        """A sentence or two saying whether the model and the implementation agree."""
        name = self.history.get("name", "history")
        if self.model_only:
            return f"{name}: run through the model alone ({len(self)} steps); nothing compared."
        differ = self.disagreements()
        lines = []
        if not differ["observation"]:
            lines.append(
                f"{name}: the model and the implementation agree at every one of the "
                f"{len(self)} steps: same lists, peer tables, diffs, events and messages in "
                "flight (IN2)."
            )
        else:
            lines.append(f"{name}: the observations DIFFER at steps {differ['observation']}.")
        if not differ["stored state"] and not differ["messages"]:
            lines.append("Stored entries, contexts, clocks and message payloads are identical too.")
        for what in ("stored state", "messages"):
            if differ[what]:
                lines.append(f"{what} differs at steps {differ[what]} (not in the observation).")
        recorded = self.expect_agrees()
        if recorded is not None:
            lines.append("The model reproduces the file's recorded expectations."
                         if recorded else "The model NO LONGER reproduces the file's `expect`.")
        return "\n".join(lines)

    def check(self) -> str:
        """Assert IN2 at every step (and the recorded expectations); return ``agreement()``."""
        differ = self.disagreements()["observation"]
        assert not differ, f"model and implementation observations differ at steps {differ}"
        assert self.expect_agrees() is not False, "the model no longer computes `expect`"
        return self.agreement()

    def _mark(self, same: bool, otherwise: str = "") -> str:
        if self.model_only:
            return "—"
        return "✓" if same else f"✗ {otherwise}".rstrip()

    # -- reading steps --

    def time(self, i: int) -> int:
        """The cluster time (ms) after step ``i``."""
        return self.model[i].now

    def observation(self, i: int) -> Json:
        return self.model[i].observation

    def cut_links(self, i: int) -> frozenset[tuple[str, str]]:
        """The directed links that are cut after step ``i``."""
        return self.model[i].cut

    def describe(self, i: int) -> str:
        """Step ``i`` in words."""
        action = self.steps[i]
        do = action["do"]
        if do in ("track", "update"):
            verb = "tracks" if do == "track" else "updates"
            return (f"{action['node']} {verb} {action['key']} [{action['owner']}] in "
                    f"{action['topic']}{_meta_text(action['meta'])}")
        if do == "untrack":
            return f"{action['node']} untracks {action['key']} [{action['owner']}]"
        if do == "untrack_owner":
            return f"{action['node']}: owner {action['owner']} ends"
        if do == "tick":
            return f"{action['node']} ticks"
        if do == "advance":
            return f"time +{action['ms']} ms → {self.time(i)} ms"
        if do in ("deliver", "drop", "duplicate"):
            before = self.model[i - 1].messages if i else ()
            message = before[action["index"]]
            text = f"{message.source}→{message.destination} {message.kind} from {message.sender}"
            return f"{do} {text}"
        if do == "cut":
            return "cut " + ", ".join(f"{a}↛{b}" for a, b in action["links"])
        if do == "heal":
            return "heal: every link open"
        if do == "stop":
            return f"{action['node']} stops " + ("gracefully" if action["graceful"] else
                                                 "(crash)")
        if do == "restart":
            replica = self.observation(i)["nodes"][action["node"]]["replica"]
            return f"{action['node']} restarts as {replica}"
        return json.dumps(action)

    def delivered(self, i: int) -> MessageView | None:
        """The message step ``i`` delivers, drops or duplicates (None for other steps)."""
        action = self.steps[i]
        if action["do"] not in ("deliver", "drop", "duplicate"):
            return None
        return self.model[i - 1].messages[action["index"]] if i else None

    def with_event(self, kind: str, observer: str | None = None) -> list[int]:
        """The steps at which a node (``observer``, or any) reported a peer event ``kind``."""
        return [
            i for i in range(len(self))
            for name, events in self.observation(i)["events"].items()
            if observer in (None, name) and any(k == kind for k, _ in events)
        ]

    def find(self, predicate: Any, start: int = 0) -> int:
        """The first step at or after ``start`` whose action satisfies ``predicate``."""
        for i in range(start, len(self)):
            if predicate(self.steps[i]):
                return i
        raise LookupError("no such step")

    # -- tables --

    def step_table(self, i: int, nodes: Sequence[str] | None = None) -> Table:
        """Each node's view after step ``i``: what it lists, its peers, this step's diff and
        events; the last column says whether the model and the implementation agree on it."""
        model, impl = self.model[i].observation, self.impl[i].observation
        rows = []
        for name in nodes or self.nodes:
            row = _node_row(name, model, impl)
            rows.append([*row[:-1], self._mark(row[-1] == "✓")])
        verdict = ("model and implementation agree" if self.observations_agree(i)
                   else "MODEL AND IMPLEMENTATION DIFFER")
        if self.model_only:
            verdict = "model only"
        title = f"step {i} (t = {self.time(i)} ms): {self.describe(i)} — {verdict}"
        table = Table(["node", "lists", "peers", "diff this step", "events", "model = impl"],
                      rows, title=title)
        if model["error"] is not None:
            table.note = f"error: {model['error']}"
        return table

    def timeline(self, first: int = 0, last: int | None = None,
                 nodes: Sequence[str] | None = None, *, only_changes: bool = False) -> Table:
        """One row per step: what happened, then what each node lists and its peers after it,
        and whether both sides agree. With ``only_changes``, steps after which no node's list,
        peers or messages changed are left out."""
        names = list(nodes or self.nodes)
        end = len(self) - 1 if last is None else last
        rows = []
        for i in range(first, end + 1):
            observation = self.observation(i)
            if only_changes and i > 0 and not _changed(self.observation(i - 1), observation):
                continue
            row = [str(i), str(self.time(i)), self.describe(i)]
            for name in names:
                row.append(_view_text(observation, name))
            row.append(self._mark(self.observations_agree(i)))
            rows.append(row)
        title = f"{self.history.get('name', 'history')}: steps {first}-{end}"
        return Table(["step", "t ms", "what happens", *names, "model = impl"], rows, title=title)

    def moments(self, moments: Sequence[tuple[int, str]],
                nodes: Sequence[str] | None = None) -> Table:
        """Each node's view at chosen steps: peer statuses, including the replicas it knew
        earlier and has forgotten (permanently down, RL3), and what it lists."""
        names = list(nodes or self.nodes)
        rows = []
        for i, label in moments:
            row = [label, str(i), str(self.time(i))]
            for name in names:
                row.append(self._status_text(i, name))
            row.append(self._mark(self.observations_agree(i)))
            rows.append(row)
        return Table(["moment", "step", "t ms", *(f"at {n}" for n in names), "model = impl"],
                     rows, title=f"{self.history.get('name', 'history')}: key moments")

    def _status_text(self, i: int, name: str) -> str:
        view = self.observation(i)["nodes"][name]
        known: set[str] = set()
        for j in range(i + 1):
            earlier = self.observation(j)["nodes"][name]
            if earlier["replica"] == view["replica"]:
                known |= set(earlier["peers"])
        statuses = dict(view["peers"])
        statuses.update({r: "forgotten" for r in known - set(view["peers"])})
        peers = "\n".join(f"{r} {s}" for r, s in sorted(statuses.items())) or "no peers"
        lists = " ".join(presence_text(p) for p in view["presences"]) or "∅"
        head = view["replica"] + ("" if view["running"] else " (stopped)")
        return f"{head}\n{peers}\nlists: {lists}"

    def states_table(self, i: int, nodes: Sequence[str] | None = None) -> Table:
        """What each node stores after step ``i``: entries with their dots (hidden ones marked),
        the context (every dot observed, ST1) and the clock (ST3)."""
        rows = []
        observation = self.observation(i)
        for name in nodes or self.nodes:
            model, impl = self.model[i].replicas[name], self.impl[i].replicas[name]
            view = observation["nodes"][name]
            up = {r for r, status in view["peers"].items() if status == "up"}
            entries = [
                e.text() + ("" if e.replica in up or e.replica == view["replica"]
                            else "  (hidden: peer down)")
                for e in model.entries
            ]
            rows.append([
                name,
                "\n".join(entries) or "—",
                context_text(model.context),
                ", ".join(f"{r}: {n}" for r, n in model.clock),
                self._mark(model == impl, "impl: " + _replica_text(impl)),
            ])
        title = f"after step {i} (t = {self.time(i)} ms): {self.describe(i)}"
        return Table(["node", "stored entries (dot, key [owner], meta)", "context", "clock",
                      "model = impl"], rows, title=title)

    def messages_table(self, i: int) -> Table:
        """The messages in flight after step ``i``, with their clocks and payloads."""
        model, impl = self.model[i].messages, self.impl[i].messages
        rows = []
        for index, message in enumerate(model):
            same = index < len(impl) and impl[index] == message
            rows.append([str(index), message.text(),
                         self._mark(same, "impl: " + (impl[index].text() if index < len(impl)
                                                      else "missing"))])
        title = f"in flight after step {i}: {self.describe(i)}"
        return Table(["#", "message", "model = impl"], rows, title=title)


def run(history: Json, *, model_only: bool = False) -> SideBySide:
    """Run a history through the model and the implementation, capturing both after every
    step. With ``model_only`` the implementation is left out (for counterfactual models)."""
    model_cluster = mc.new_cluster(list(history["nodes"]), mh.config_of(history))
    impl_cluster = ImplCluster(list(history["nodes"]), replay.impl_config(history))
    result = SideBySide(history, model_only=model_only)
    for action in history["steps"]:
        model_cluster, step, error = mh.apply(model_cluster, action)
        result.model.append(
            _capture_model(model_cluster, mh.observation(model_cluster, step, error))
        )
        if model_only:
            result.impl.append(result.model[-1])
            continue
        impl_step, impl_error = replay.apply(impl_cluster, action)
        result.impl.append(
            _capture_impl(impl_cluster, replay.observation(impl_cluster, impl_step, impl_error))
        )
    return result


# --- text -------------------------------------------------------------------------------------


def _meta_text(meta: Json) -> str:
    fields = {k: v for k, v in meta.items() if k not in ("phx_ref", "phx_ref_prev")}
    text = " {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in sorted(fields.items())) + "}"
    text = text if fields else ""
    if "phx_ref_prev" in meta:
        text += f" prev {meta['phx_ref_prev']}"
    return text


def presence_text(presence: Json, *, owner: bool = False, meta: bool = False) -> str:
    """A presence ``[topic, key, owner, meta]`` as ``key@ref``, optionally with owner and meta."""
    _, key, who, fields = presence
    text = f"{key}@{fields['phx_ref']}"
    if owner:
        text += f" [{who}]"
    if meta:
        text += _meta_text(fields)
    return text


def context_text(context: Iterable[tuple[str, Iterable[int]]]) -> str:
    """A context as ``replica: counter ranges``, e.g. ``a.1: 1-3, 5``."""
    parts = []
    for replica, counters in context:
        ranges: list[list[int]] = []
        for n in counters:
            if ranges and n == ranges[-1][1] + 1:
                ranges[-1][1] = n
            else:
                ranges.append([n, n])
        text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
        parts.append(f"{replica}: {text}")
    return "; ".join(parts) or "∅"


def _replica_text(view: ReplicaView) -> str:
    entries = ", ".join(e.text() for e in view.entries)
    return f"entries {entries}; context {context_text(view.context)}"


def _diff_text(diff: Json | None) -> str:
    if not diff:
        return ""
    joins = [f"+{presence_text(p, meta=True)}" for p in diff["joins"]]
    leaves = [f"-{presence_text(p, meta=True)}" for p in diff["leaves"]]
    return "\n".join(joins + leaves)


def _peers_text(peers: dict[str, str]) -> str:
    return ", ".join(f"{r} {status}" for r, status in sorted(peers.items())) or "—"


def _view_text(observation: Json, name: str) -> str:
    view = observation["nodes"][name]
    lists = " ".join(presence_text(p) for p in view["presences"]) or "∅"
    marks = "".join(f" {r}{'↑' if s == 'up' else '↓'}" for r, s in sorted(view["peers"].items()))
    state = "" if view["running"] else " (stopped)"
    return f"{view['replica']}{state}: {lists} |{marks or ' no peers'}"


def _node_row(name: str, model: Json, impl: Json) -> list[str]:
    view = model["nodes"][name]
    state = "" if view["running"] else " (stopped)"
    same = (model["nodes"][name] == impl["nodes"][name]
            and model["diffs"].get(name) == impl["diffs"].get(name)
            and model["events"].get(name) == impl["events"].get(name))
    return [
        f"{name} = {view['replica']}{state}",
        "\n".join(presence_text(p, owner=True, meta=True) for p in view["presences"]) or "∅",
        _peers_text(view["peers"]),
        _diff_text(model["diffs"].get(name)),
        ", ".join(f"{kind} {replica}" for kind, replica in model["events"].get(name, [])),
        "✓" if same else "✗",
    ]


def _changed(before: Json, after: Json) -> bool:
    return bool(before["nodes"] != after["nodes"] or after["diffs"] or after["events"])


class Table:
    """A small table that shows as HTML in a notebook and as aligned text elsewhere."""

    def __init__(self, header: Sequence[str], rows: Sequence[Sequence[str]], *,
                 title: str = "", note: str = "") -> None:
        self.header = list(header)
        self.rows = [list(row) for row in rows]
        self.title = title
        self.note = note

    def __repr__(self) -> str:
        cells = [self.header, *self.rows]
        split = [[cell.split("\n") for cell in row] for row in cells]
        widths = [max(len(line) for row in split for line in row[col]) for col in
                  range(len(self.header))]
        lines = [self.title] if self.title else []
        for number, row in enumerate(split):
            height = max(len(cell) for cell in row)
            for k in range(height):
                lines.append(" | ".join(
                    (cell[k] if k < len(cell) else "").ljust(widths[col])
                    for col, cell in enumerate(row)
                ).rstrip())
            if number == 0:
                lines.append("-+-".join("-" * w for w in widths))
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        def cell(tag: str, text: str) -> str:
            body = html.escape(text).replace("\n", "<br>")
            style = "text-align:left; vertical-align:top; font-family:monospace; padding:2px 8px"
            return f'<{tag} style="{style}">{body}</{tag}>'

        parts = ["<table>"]
        if self.title:
            parts.append(f'<caption style="text-align:left"><b>{html.escape(self.title)}</b>'
                         "</caption>")
        parts.append("<tr>" + "".join(cell("th", h) for h in self.header) + "</tr>")
        parts.extend("<tr>" + "".join(cell("td", c) for c in row) + "</tr>" for row in self.rows)
        parts.append("</table>")
        if self.note:
            parts.append(f"<p>{html.escape(self.note)}</p>")
        return "".join(parts)


# --- pictures -----------------------------------------------------------------------------------


class Picture:
    """A matplotlib figure rendered by the Agg backend, shown inline as a PNG."""

    def __init__(self, figure: Figure, description: str) -> None:
        self.figure = figure
        self.description = description

    def png(self) -> bytes:
        buffer = io.BytesIO()
        FigureCanvasAgg(self.figure)  # the Agg canvas: no GUI, no pyplot state
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue()

    def _repr_png_(self) -> bytes:
        return self.png()

    def __repr__(self) -> str:
        return f"<picture: {self.description}>"


UP_COLOUR, DOWN_COLOUR, GONE_COLOUR, CUT_COLOUR = "#2e8b57", "#e08a00", "#bbbbbb", "#c0392b"


def _layout(nodes: Sequence[str]) -> dict[str, tuple[float, float]]:
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    positions = nx.circular_layout(graph) if len(nodes) > 2 else {
        n: (float(k) * 2 - 1, 0.0) for k, n in enumerate(nodes)}
    return {n: (float(x), float(y)) for n, (x, y) in positions.items()}


def draw_connectivity(result: SideBySide, moments: Sequence[tuple[int, str]]) -> Picture:
    """For each ``(step, title)``: on top the network (which directed links are open or cut,
    which nodes run), below each running node's view of its peers (an arrow x→y coloured by the
    status of y at x: up, down; no arrow when y is unknown to x or forgotten), with what each
    node lists beside it."""
    nodes = result.nodes
    positions = _layout(nodes)
    figure = Figure(figsize=(4.2 * len(moments), 7.6))
    for column, (i, title) in enumerate(moments):
        observation = result.observation(i)
        cut = result.cut_links(i)
        for row in range(2):
            axes = figure.add_subplot(2, len(moments), row * len(moments) + column + 1)
            axes.set_axis_off()
            axes.set_xlim(-1.8, 1.8)
            axes.set_ylim(-1.9, 1.9)
            graph = nx.DiGraph()
            graph.add_nodes_from(nodes)
            running = [n for n in nodes if observation["nodes"][n]["running"]]
            colours = ["#dfe8f5" if n in running else "#eeeeee" for n in nodes]
            if row == 0:
                axes.set_title(f"{title}\nstep {i}, t = {result.time(i)} ms\nnetwork",
                               fontsize=10)
                open_links = [(a, b) for a in nodes for b in nodes
                              if a != b and (a, b) not in cut]
                cut_links = [(a, b) for a, b in cut if a in nodes and b in nodes]
                nx.draw_networkx_edges(graph, positions, edgelist=open_links, ax=axes,
                                       edge_color="#555555", arrows=True, arrowsize=12,
                                       connectionstyle="arc3,rad=0.12", node_size=1500)
                nx.draw_networkx_edges(graph, positions, edgelist=cut_links, ax=axes,
                                       edge_color=CUT_COLOUR, style="dashed", arrows=True,
                                       arrowsize=12, connectionstyle="arc3,rad=0.12",
                                       node_size=1500)
                labels = {n: n if n in running else f"{n} ✕" for n in nodes}
            else:
                axes.set_title("views: x→y is y's status at x", fontsize=10)
                for status, colour in (("up", UP_COLOUR), ("down", DOWN_COLOUR)):
                    edges = [
                        (a, replica.split(".")[0])
                        for a in running
                        for replica, s in observation["nodes"][a]["peers"].items()
                        if s == status and replica.split(".")[0] in nodes
                    ]
                    nx.draw_networkx_edges(graph, positions, edgelist=edges, ax=axes,
                                           edge_color=colour, width=2, arrows=True,
                                           arrowsize=12, connectionstyle="arc3,rad=0.12",
                                           node_size=1500)
                labels = {n: observation["nodes"][n]["replica"] for n in nodes}
                for n in running:
                    listed = [p[1] for p in observation["nodes"][n]["presences"]]
                    x, y = positions[n]
                    ha = "left" if x > 0.3 else "right" if x < -0.3 else "center"
                    va = "bottom" if y > 0.3 else "top" if y < -0.3 else "center"
                    axes.text(x * 1.3 + (0.1 if x > 0.3 else -0.1 if x < -0.3 else 0),
                              y * 1.3 + (0.1 if y > 0.3 else -0.1 if y < -0.3 else 0),
                              "\n".join(listed) or "(nothing)", ha=ha, va=va, fontsize=8,
                              color="#1f3f6e")
            nx.draw_networkx_nodes(graph, positions, ax=axes, node_color=colours,
                                   edgecolors="#333333", node_size=1500)
            nx.draw_networkx_labels(graph, positions, labels=labels, ax=axes, font_size=9)
    figure.legend(handles=[
        Patch(facecolor="#eeeeee", edgecolor="#333333", label="✕ stopped"),
        Patch(color="#555555", label="link open"),
        Patch(color=CUT_COLOUR, label="link cut"),
        Patch(color=UP_COLOUR, label="peer up"),
        Patch(color=DOWN_COLOUR, label="peer down"),
    ], loc="lower center", ncol=5, fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    steps = ", ".join(str(i) for i, _ in moments)
    return Picture(figure, f"connectivity and views at steps {steps}")


def draw_status_timeline(result: SideBySide, observers: Sequence[str] | None = None,
                         notes: Sequence[tuple[int, str, str]] = ()) -> Picture:
    """Time on the x axis; one panel per observer node. Its upper bands show each peer node's
    status at the observer (up, down, or absent: unknown or forgotten), with the incarnation
    written on the band and a cross at each permdown; its lower bands show when the observer
    lists each presence. ``notes`` are ``(step, observer, text)`` labels to pin on a panel."""
    names = list(observers or result.nodes)
    end = result.time(len(result) - 1) + CONFIG["broadcast_period"]
    listed_by = {name: _listed(result, name) for name in names}
    heights = [len(result.nodes) + len(listed_by[name]) + 1.5 for name in names]
    figure = Figure(figsize=(12, 0.32 * sum(heights) + 1.2))
    grid = figure.add_gridspec(len(names), 1, height_ratios=heights)
    for panel, observer in enumerate(names):
        axes = figure.add_subplot(grid[panel])
        peers = [n for n in result.nodes if n != observer]
        presences = listed_by[observer]
        mine = [(i, text) for i, who, text in notes if who == observer]
        labels = [*(["notes"] if mine else []), *(f"status of {p}" for p in peers),
                  *(f"lists {p}" for p in presences)]
        row = {label: len(labels) - 1 - k for k, label in enumerate(labels)}
        for peer, (start, stop, status, replica) in _status_segments(result, observer, end):
            if status == "stopped":
                continue
            colour = {"up": UP_COLOUR, "down": DOWN_COLOUR}.get(status, GONE_COLOUR)
            y = row[f"status of {peer}"]
            axes.barh(y, stop - start, left=start, height=0.7, color=colour,
                      alpha=1.0 if status in ("up", "down") else 0.35, edgecolor="white")
            if status in ("up", "down") and stop - start > 0.05 * end:
                axes.text((start + stop) / 2, y, f"{replica} {status}", ha="center",
                          va="center", fontsize=8, color="white")
        for presence in presences:
            for start, stop in _listed_spans(result, observer, presence, end):
                axes.barh(row[f"lists {presence}"], stop - start, left=start, height=0.45,
                          color=LIST_COLOUR)
        for i in range(len(result)):
            for kind, replica in result.observation(i)["events"].get(observer, []):
                peer = replica.split(".")[0]
                if kind == "permdown" and peer in peers:
                    axes.plot(result.time(i), row[f"status of {peer}"], marker="X",
                              color="black", markersize=9)
        for start, stop in _stopped_spans(result, observer, end):
            axes.axvspan(start, stop, color="#f2f2f2", zorder=0)
        for k, (i, text) in enumerate(mine):
            axes.axvline(result.time(i), color="#333333", linestyle=":", linewidth=1.2)
            axes.text(result.time(i), row["notes"] + (0.2 if k % 2 == 0 else -0.25),
                      f" {text} ", fontsize=8, va="center",
                      ha="right" if result.time(i) > end / 2 else "left")
        axes.set_yticks(list(row.values()), list(row), fontsize=8)
        axes.set_ylim(-0.7, len(labels) + 0.3)
        axes.set_xlim(0, end)
        axes.axhline(len(presences) - 0.5, color="#999999", linewidth=0.6)
        axes.set_title(f"as seen by {observer}", fontsize=10, loc="left")
        if panel == len(names) - 1:
            axes.set_xlabel("time (ms)")
    figure.legend(handles=[
        Patch(color=UP_COLOUR, label="up"),
        Patch(color=DOWN_COLOUR, label="down"),
        Patch(color=GONE_COLOUR, alpha=0.35, label="unknown / forgotten"),
        Patch(color="black", label="X: permdown"),
        Patch(color=LIST_COLOUR, label="listed"),
        Patch(color="#f2f2f2", label="observer stopped"),
    ], loc="lower center", ncol=6, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return Picture(figure, f"peer status and listed presences over time at {', '.join(names)}")


LIST_COLOUR = "#4a78b5"


def _listed(result: SideBySide, observer: str) -> list[str]:
    """Every presence (``key@ref``) the observer ever lists, in order of first appearance."""
    seen: dict[str, None] = {}
    for i in range(len(result)):
        for presence in result.observation(i)["nodes"][observer]["presences"]:
            seen.setdefault(presence_text(presence), None)
    return list(seen)


def _listed_spans(result: SideBySide, observer: str, presence: str, end: int
                  ) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for i, start, stop in _instants(result, end):
        view = result.observation(i)["nodes"][observer]
        if view["running"] and presence in {presence_text(p) for p in view["presences"]}:
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((start, stop))
    return spans


def _stopped_spans(result: SideBySide, observer: str, end: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for i, start, stop in _instants(result, end):
        if not result.observation(i)["nodes"][observer]["running"]:
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((start, stop))
    return spans


def _status_segments(result: SideBySide, observer: str, end: int
                     ) -> list[tuple[str, tuple[int, int, str, str]]]:
    """Per peer node, the intervals of its status at ``observer``: at each instant, the status
    after the last step at that instant (a change and its reversal within one instant is shown
    by the events, not here)."""
    segments: list[tuple[str, tuple[int, int, str, str]]] = []
    for peer in (n for n in result.nodes if n != observer):
        for i, start, stop in _instants(result, end):
            view = result.observation(i)["nodes"][observer]
            known = [(r, s) for r, s in view["peers"].items() if r.split(".")[0] == peer]
            replica, status = max(known) if known else ("", "absent")
            if not view["running"]:
                replica, status = "", "stopped"
            if segments and segments[-1][0] == peer and segments[-1][1][2:] == (status, replica):
                first = segments[-1][1][0]
                segments[-1] = (peer, (first, stop, status, replica))
            else:
                segments.append((peer, (start, stop, status, replica)))
    return segments


def _instants(result: SideBySide, end: int) -> list[tuple[int, int, int]]:
    """(last step at an instant, start, stop) for each instant of the history."""
    out: list[tuple[int, int, int]] = []
    last_by_time: dict[int, int] = {}
    for i in range(len(result)):
        last_by_time[result.time(i)] = i
    times = sorted(last_by_time)
    for k, t in enumerate(times):
        stop = times[k + 1] if k + 1 < len(times) else end
        out.append((last_by_time[t], t, stop))
    return out
