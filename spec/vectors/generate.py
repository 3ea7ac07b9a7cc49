"""Generate the conformance vectors in this directory (format: spec/vectors.md).

Each scenario below is a short list of history steps. Running this script runs every scenario
through the executable model (``presence_model.history.run``) and writes ``<name>.json`` with the
model's observation after every step. ``--check`` writes nothing: it exits non-zero and names every
file that is missing, differs from what the model produces now, or belongs to no scenario.

To keep the scenarios readable, a step that acts on a message in flight may name the message
instead of giving its index: ``deliver("a", "b", "heartbeat")`` is the first message in flight
from a to b of that kind (``sender=`` and ``nth=`` narrow the choice). ``flush()`` stands for
delivering the first message in flight until none is left. Both are resolved here, against the
model's network, into plain ``{"do": "deliver", "index": i}`` steps, so the files hold only steps
that ``presence_model.history.apply`` accepts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

try:
    import presence_model.history as mh
    from presence_model import cluster as mc
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(HERE.parents[1] / "model"))
    import presence_model.history as mh
    from presence_model import cluster as mc

Json = Any
Step = dict[str, Any]

CONFIG: dict[str, int] = {
    "broadcast_period": 100,
    "max_silent_periods": 3,
    "down_period": 500,
    "permdown_period": 1500,
    "clock_sample_periods": 2,
}

# Real-world fault classes; every one has at least one dedicated vector (tests/test_vectors.py).
FAULTS: dict[str, str] = {
    "catch-up": "a peer missed a delta and recovers the exact state by transfer",
    "relay-after-split": "a removal reaches a node only through a third node (DL2)",
    "old-incarnation": "a delayed message of a restarted node's previous incarnation",
    "stale-transfer": "a transfer_ack delivered after a newer update",
    "silence-and-shutdown": "down and permdown by silence, and graceful shutdown",
    "churn-within-period": "an update, and a leave and rejoin, within one broadcast period",
    "duplicate-reorder": "duplicated and reordered messages",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    rules: tuple[str, ...]
    nodes: tuple[str, ...]
    steps: tuple[Step, ...]
    faults: tuple[str, ...] = ()
    config: dict[str, int] = field(default_factory=lambda: dict(CONFIG))


# --- step constructors ---------------------------------------------------------------------------


def track(node: str, owner: str, topic: str, key: str, meta: Json | None = None) -> Step:
    return {"do": "track", "node": node, "owner": owner, "topic": topic, "key": key,
            "meta": meta if meta is not None else {}}


def untrack(node: str, owner: str, topic: str, key: str) -> Step:
    return {"do": "untrack", "node": node, "owner": owner, "topic": topic, "key": key}


def update(node: str, owner: str, topic: str, key: str, meta: Json) -> Step:
    return {"do": "update", "node": node, "owner": owner, "topic": topic, "key": key, "meta": meta}


def untrack_owner(node: str, owner: str) -> Step:
    return {"do": "untrack_owner", "node": node, "owner": owner}


def tick(node: str) -> Step:
    return {"do": "tick", "node": node}


def ticks(*nodes: str) -> list[Step]:
    return [tick(node) for node in nodes]


def advance(ms: int) -> Step:
    return {"do": "advance", "ms": ms}


def _message(do: str, source: str, destination: str, kind: str | None, sender: str | None,
             nth: int) -> Step:
    return {"do": do, "find": [source, destination, kind, sender], "nth": nth}


def deliver(source: str, destination: str, kind: str | None = None, *, sender: str | None = None,
            nth: int = 0) -> Step:
    return _message("deliver", source, destination, kind, sender, nth)


def drop(source: str, destination: str, kind: str | None = None, *, sender: str | None = None,
         nth: int = 0) -> Step:
    return _message("drop", source, destination, kind, sender, nth)


def duplicate(source: str, destination: str, kind: str | None = None, *,
              sender: str | None = None, nth: int = 0) -> Step:
    return _message("duplicate", source, destination, kind, sender, nth)


def flush() -> Step:
    return {"do": "flush"}


def cut(*links: tuple[str, str]) -> Step:
    return {"do": "cut", "links": [list(link) for link in links]}


def split(a: str, b: str) -> Step:
    """Both directions between two nodes cut."""
    return cut((a, b), (b, a))


def heal() -> Step:
    return {"do": "heal"}


def stop(node: str, graceful: bool) -> Step:
    return {"do": "stop", "node": node, "graceful": graceful}


def restart(node: str) -> Step:
    return {"do": "restart", "node": node}


# --- the scenarios -------------------------------------------------------------------------------

LOBBY = "room:lobby"
IN2 = "IN2"  # every vector is a step-by-step agreement check between model and implementation


def meet(*nodes: str) -> list[Step]:
    """Every node ticks once (a first tick always broadcasts) and everything is delivered."""
    return [*ticks(*nodes), flush()]


def rounds(count: int, *nodes: str) -> list[Step]:
    """``count`` broadcast periods: time moves on, every node ticks, everything is delivered."""
    steps: list[Step] = []
    for _ in range(count):
        steps += [advance(CONFIG["broadcast_period"]), *ticks(*nodes), flush()]
    return steps


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="track-visible-everywhere",
        description=(
            "Three fresh nodes that know nobody; a tracks one presence and every node ticks once. "
            "Each first tick broadcasts (a's with the delta, b's and c's empty); once delivered, "
            "every node has every other one up and b and c report the join with ref a.1.1."
        ),
        rules=("ST1", "ST2", "OP1", "ID4", "ST4", "DL1", "GP1", "GP2", "GP3", "FD2", "RL1",
               "MG2", "MG5", "IN1", IN2),
        nodes=("a", "b", "c"),
        steps=(
            track("a", "sock-alice", LOBBY, "alice", {"status": "online"}),
            *meet("a", "b", "c"),
        ),
    ),
    Scenario(
        name="local-errors",
        description=(
            "Tracking a handle twice fails with already_tracked, updating an untracked handle "
            "fails with not_tracked, untracking one is silently nothing: none of them consumes a "
            "dot. A second owner may share the key, and a re-track after an untrack gets a fresh "
            "ref (a.1.4: the untrack consumed a.1.3)."
        ),
        rules=("ID2", "ID3", "ID5", "OP1", "OP2", "OP3", "IN1", IN2),
        nodes=("a", "b"),
        steps=(
            track("a", "sock-alice", LOBBY, "alice"),
            track("a", "sock-alice", LOBBY, "alice", {"again": True}),
            track("a", "sock-bob", LOBBY, "alice"),
            update("a", "sock-carol", LOBBY, "alice", {"status": "away"}),
            untrack("a", "sock-carol", LOBBY, "alice"),
            untrack("a", "sock-alice", LOBBY, "alice"),
            track("a", "sock-alice", LOBBY, "alice"),
            *meet("a", "b"),
        ),
    ),
    Scenario(
        name="refs-and-update-meta",
        description=(
            "Refs supplied by the caller are never kept: a track stores only its own phx_ref, an "
            "update replaces the meta entirely (the old status is gone) and sets phx_ref and "
            "phx_ref_prev. The peer reports the update as one diff: the join and the leave."
        ),
        rules=("ID4", "OP1", "OP3", "DL1", "MG2", "MG3", "MG5", "IN1", IN2),
        nodes=("a", "b"),
        steps=(
            track("a", "sock-alice", LOBBY, "alice",
                  {"phx_ref": "forged", "phx_ref_prev": "forged", "status": "away"}),
            *meet("a", "b"),
            advance(100),
            update("a", "sock-alice", LOBBY, "alice", {"phx_ref": "forged", "typing": True}),
            tick("a"),
            deliver("a", "b", "heartbeat"),
        ),
    ),
    Scenario(
        name="update-and-rejoin-within-one-period",
        description=(
            "Within one broadcast period a updates alice twice and untracks then re-tracks bob. "
            "The single delta makes b report one diff: the final alice (a.1.4) and the new bob "
            "join, the old ones leave; the intermediate alice (a.1.3) is never seen by b."
        ),
        rules=("OP1", "OP2", "OP3", "DL1", "MG2", "MG3", "MG5", "IN1", IN2),
        faults=("churn-within-period",),
        nodes=("a", "b"),
        steps=(
            track("a", "sock-alice", LOBBY, "alice", {"status": "online"}),
            track("a", "sock-bob", LOBBY, "bob"),
            *meet("a", "b"),
            advance(100),
            update("a", "sock-alice", LOBBY, "alice", {"status": "away"}),
            update("a", "sock-alice", LOBBY, "alice", {"status": "busy"}),
            untrack("a", "sock-bob", LOBBY, "bob"),
            track("a", "sock-bob", LOBBY, "bob"),
            tick("a"),
            deliver("a", "b", "heartbeat"),
        ),
    ),
    Scenario(
        name="owner-exit",
        description=(
            "An owner holding presences on two topics ends: one diff leaves both, on a and, after "
            "the next heartbeat, on b; another owner's presence stays. Ending an owner that holds "
            "nothing reports nothing."
        ),
        rules=("OP4", "DL1", "MG3", "MG5", "IN1", IN2),
        nodes=("a", "b"),
        steps=(
            track("a", "sock-alice", LOBBY, "alice"),
            track("a", "sock-alice", "room:games", "alice"),
            track("a", "sock-bob", LOBBY, "bob"),
            *meet("a", "b"),
            advance(100),
            untrack_owner("a", "sock-alice"),
            untrack_owner("a", "sock-nobody"),
            tick("a"),
            deliver("a", "b", "heartbeat"),
        ),
    ),
    Scenario(
        name="observation-order",
        description=(
            "Presences are listed by (topic, key, owner, phx_ref) in Unicode code-point order: "
            "'Room:b' before 'room:a'; 'Zoe', 'zoe', 'éva', then fullwidth '\uff5a' (U+FF5A) "
            "before '\U0001d4b5' (U+1D4B5, which UTF-16 code-unit order would put first); owner "
            "'sock-10' before 'sock-2'. Both nodes list the same presences in the same order."
        ),
        rules=("ID5", "OP1", "IN1", IN2),
        nodes=("a", "b"),
        steps=(
            track("a", "sock-2", "room:a", "Zoe"),
            track("a", "sock-3", "room:a", "zoe"),
            track("b", "sock-10", "room:a", "Zoe"),
            track("b", "sock-4", "room:a", "éva"),
            track("b", "sock-5", "Room:b", "Zoe"),
            track("a", "sock-6", "room:a", "\U0001d4b5"),
            track("b", "sock-7", "room:a", "\uff5a"),
            *meet("a", "b"),
        ),
    ),
    Scenario(
        name="catch-up-after-missed-delta",
        description=(
            "b misses the delta that removed alice and added bob, then gets the next one (carol). "
            "Until it catches up b shows the ghost alice and lacks bob; its clock for a stays at 1 "
            "(dot 4 is not contiguous), so its sample asks a, and the transfer_ack fixes both."
        ),
        rules=("ST3", "GP1", "GP3", "GP4", "GP5", "GP6", "DL3", "MG2", "MG3", "IN1", IN2),
        faults=("catch-up",),
        nodes=("a", "b"),
        steps=(
            *meet("a", "b"),
            track("a", "sock-alice", LOBBY, "alice"),
            advance(100),
            tick("a"),
            deliver("a", "b", "heartbeat"),
            untrack("a", "sock-alice", LOBBY, "alice"),
            track("a", "sock-bob", LOBBY, "bob"),
            advance(100),
            tick("a"),
            drop("a", "b", "heartbeat"),  # the delta with alice's removal and bob
            track("a", "sock-carol", LOBBY, "carol"),
            advance(100),
            tick("a"),
            deliver("a", "b", "heartbeat"),
            tick("b"),  # b's second tick: a sample
            deliver("b", "a", "transfer_req"),
            deliver("a", "b", "transfer_ack"),
        ),
    ),
    Scenario(
        name="relay-removal-through-third-node",
        description=(
            "a and b cannot reach each other; c reaches both. a untracks alice and tracks ann; c "
            "relays the removal in its own delta, so b drops alice without hearing from a, but "
            "not ann (additions are not relayed): b gets ann by a transfer from c. After the heal "
            "all three list ann only."
        ),
        rules=("DL2", "MG3", "MG5", "GP4", "GP5", "GP6", "FD2", "IN1", IN2),
        faults=("relay-after-split",),
        nodes=("a", "b", "c"),
        steps=(
            track("a", "sock-alice", LOBBY, "alice"),
            *meet("a", "b", "c"),
            split("a", "b"),
            advance(100),
            untrack("a", "sock-alice", LOBBY, "alice"),
            track("a", "sock-ann", LOBBY, "ann"),
            tick("a"),
            deliver("a", "c", "heartbeat"),
            tick("c"),
            deliver("c", "b", "heartbeat"),
            deliver("c", "a", "heartbeat"),
            tick("b"),
            deliver("b", "c", "transfer_req"),
            deliver("c", "b", "transfer_ack"),
            heal(),
            *rounds(3, "a", "b", "c"),
        ),
    ),
    Scenario(
        name="restart-old-incarnation-ignored",
        description=(
            "a crashes with a heartbeat of a.1 (adding bob) still in flight and restarts as a.2. "
            "a.2 does not take back a.1's alice from b's transfer_ack; b retires a.1 (permdown, "
            "alice leaves) the moment it hears a.2, and then ignores a.1's late heartbeat: bob "
            "never appears."
        ),
        rules=("ID1", "RL3", "RL4", "GP8", "FD2", "MG1", "ST5", "GP4", "GP5", "GP6", "IN1", IN2),
        faults=("old-incarnation",),
        nodes=("a", "b"),
        steps=(
            track("a", "sock-alice", LOBBY, "alice"),
            track("b", "sock-dave", LOBBY, "dave"),
            *meet("a", "b"),
            advance(100),
            track("a", "sock-bob", LOBBY, "bob"),
            tick("a"),  # this heartbeat of a.1 stays in flight to the end
            tick("b"),
            stop("a", graceful=False),
            restart("a"),
            advance(100),
            track("a", "sock-carol", LOBBY, "carol"),
            tick("a"),
            tick("b"),
            advance(100),
            tick("b"),  # b's idle heartbeat; its clock has b.1 ahead of what a.2 holds
            deliver("b", "a", "heartbeat"),
            tick("a"),
            deliver("a", "b", "transfer_req"),
            deliver("b", "a", "transfer_ack"),
            deliver("a", "b", "heartbeat", sender="a.2"),
            deliver("a", "b", "heartbeat", sender="a.1"),
        ),
    ),
    Scenario(
        name="stale-transfer-ack",
        description=(
            "b asks a for a transfer; before the ack arrives a updates alice and untracks bob, and "
            "that heartbeat overtakes the ack. The late ack (old alice, bob) changes nothing: "
            "its dots are already in b's context, so it neither resurrects bob nor rolls alice "
            "back."
        ),
        rules=("ST3", "MG2", "MG3", "MG4", "DL3", "GP4", "GP5", "GP6", "IN1", IN2),
        faults=("stale-transfer",),
        nodes=("a", "b"),
        steps=(
            *meet("a", "b"),
            track("a", "sock-alice", LOBBY, "alice", {"v": 1}),
            advance(100),
            tick("a"),
            drop("a", "b", "heartbeat"),
            tick("b"),
            track("a", "sock-bob", LOBBY, "bob"),
            advance(100),
            tick("a"),
            deliver("a", "b", "heartbeat"),
            tick("b"),
            advance(100),
            tick("b"),
            deliver("b", "a", "transfer_req"),  # the ack now in flight holds alice v1 and bob
            update("a", "sock-alice", LOBBY, "alice", {"v": 2}),
            untrack("a", "sock-bob", LOBBY, "bob"),
            tick("a"),
            deliver("a", "b", "heartbeat"),
            deliver("a", "b", "transfer_ack"),
            flush(),
        ),
    ),
    Scenario(
        name="down-and-permdown-by-silence",
        description=(
            "b crashes. a keeps ticking (its idle heartbeats to the stopped b are lost): b goes "
            "down only once the silence is strictly longer than down_period (at 501 ms, not 500), "
            "and bob leaves; it is permanently down and forgotten after strictly more than "
            "permdown_period, with no second leave."
        ),
        rules=("FD1", "RL2", "RL3", "ST4", "GP2", IN2),
        faults=("silence-and-shutdown",),
        nodes=("a", "b"),
        steps=(
            track("b", "sock-bob", LOBBY, "bob"),
            *meet("a", "b"),
            stop("b", graceful=False),
            advance(100),
            tick("a"),
            advance(100),
            tick("a"),
            advance(100),
            tick("a"),
            deliver("a", "b", "heartbeat"),
            advance(200),
            tick("a"),
            advance(1),
            tick("a"),
            advance(999),
            tick("a"),
            advance(1),
            tick("a"),
        ),
    ),
    Scenario(
        name="graceful-shutdown",
        description=(
            "c stops gracefully: a, which has c up, forgets it at once and carol leaves; b, which "
            "already has c down, forgets it without a second leave; d, which never heard of c, "
            "ignores the announcement. d's own graceful stop is ignored by a (d is unknown there) "
            "and its message to the stopped c is lost."
        ),
        rules=("GP1", "GP7", "RL2", "RL3", "FD1", IN2),
        faults=("silence-and-shutdown",),
        nodes=("a", "b", "c", "d"),
        steps=(
            track("c", "sock-carol", LOBBY, "carol"),
            cut(("a", "d"), ("b", "d"), ("c", "d")),
            *meet("a", "b", "c"),
            heal(),
            advance(600),
            tick("b"),
            stop("c", graceful=True),
            deliver("c", "a", "graceful_permdown"),
            deliver("c", "b", "graceful_permdown"),
            deliver("c", "d", "graceful_permdown"),
            stop("d", graceful=True),
            deliver("d", "a", "graceful_permdown"),
            deliver("d", "c", "graceful_permdown"),
            flush(),
        ),
    ),
    Scenario(
        name="graceful-stop-overtakes-heartbeat",
        description=(
            "a tracks alice, ticks and stops gracefully; at b the announcement overtakes a's "
            "last heartbeat. b retires a.1 (RL5), so the late heartbeat is ignored instead of "
            "bringing the stopped node back up with alice until down_period. A later "
            "incarnation a.2 is heard as usual."
        ),
        rules=("RL5", "GP7", "GP8", "RL4", "FD2", IN2),
        faults=("silence-and-shutdown",),
        nodes=("a", "b"),
        steps=(
            *meet("a", "b"),
            track("a", "sock-alice", LOBBY, "alice"),
            tick("a"),
            stop("a", graceful=True),
            deliver("a", "b", "graceful_permdown"),
            deliver("a", "b", "heartbeat"),
            restart("a"),
            tick("a"),
            flush(),
        ),
    ),
    Scenario(
        name="partition-down-then-up",
        description=(
            "A split longer than down_period: each side has the other down and a reports bob and "
            "bill as left. b untracks bill before the heal; its first heartbeat after the heal "
            "brings b up and removes bill in the same step, so a's diff holds only the join of "
            "bob (bill is in neither list)."
        ),
        rules=("FD1", "FD2", "RL1", "RL2", "ST4", "DF1", "GP3", "MG3", "MG5", "IN1", IN2),
        faults=("silence-and-shutdown",),
        nodes=("a", "b"),
        steps=(
            track("b", "sock-bob", LOBBY, "bob"),
            track("b", "sock-bill", LOBBY, "bill"),
            *meet("a", "b"),
            split("a", "b"),
            advance(600),
            tick("a"),
            tick("b"),
            untrack("b", "sock-bill", LOBBY, "bill"),
            heal(),
            tick("b"),
            deliver("b", "a", "heartbeat"),
            tick("a"),
            tick("a"),
            deliver("a", "b", "heartbeat"),
        ),
    ),
    Scenario(
        name="transfer-ack-not-a-sign-of-life",
        description=(
            "a asks b for a transfer, then b goes quiet and a marks it down before the ack "
            "arrives. The ack is merged silently (bob is stored, hidden, no diff) and b stays "
            "down; b's next heartbeat brings it up and bob, bill and ben join."
        ),
        rules=("GP4", "GP5", "GP6", "MG5", "RL1", "RL2", "ST3", "ST4", "FD1", "FD2", "IN1", IN2),
        nodes=("a", "b"),
        steps=(
            *meet("a", "b"),
            track("b", "sock-bob", LOBBY, "bob"),
            advance(100),
            tick("a"),
            tick("b"),
            drop("b", "a", "heartbeat"),
            track("b", "sock-bill", LOBBY, "bill"),
            advance(100),
            tick("a"),
            tick("b"),
            deliver("b", "a", "heartbeat"),
            advance(100),
            tick("a"),
            deliver("a", "b", "transfer_req"),
            deliver("a", "b", "heartbeat"),
            advance(500),
            tick("a"),
            deliver("b", "a", "transfer_ack"),
            track("b", "sock-ben", LOBBY, "ben"),
            tick("b"),
            deliver("b", "a", "heartbeat"),
        ),
    ),
    Scenario(
        name="permdown-then-heard-again",
        description=(
            "A split longer than permdown_period: each side forgets the other entirely. After "
            "the heal b.1 is heard again with the same vsn and is treated as new: it comes up "
            "with nothing stored, and bob comes back only through the transfer a then asks for."
        ),
        rules=("FD1", "FD3", "RL1", "RL2", "RL3", "GP4", "GP5", "GP6", "IN1", IN2),
        faults=("silence-and-shutdown",),
        nodes=("a", "b"),
        steps=(
            track("b", "sock-bob", LOBBY, "bob"),
            *meet("a", "b"),
            split("a", "b"),
            advance(600),
            tick("a"),
            tick("b"),
            advance(1000),
            tick("a"),
            tick("b"),
            heal(),
            tick("b"),
            deliver("b", "a", "heartbeat"),
            tick("a"),
            deliver("a", "b", "heartbeat"),
            deliver("a", "b", "transfer_req"),
            deliver("b", "a", "transfer_ack"),
        ),
    ),
    Scenario(
        name="unknown-replica-ignored",
        description=(
            "b has heard c but not a. c answers b's transfer_req although it has never heard of "
            "b, and b keeps carol from the ack but drops a's alice (a is unknown to b). Once b "
            "hears a, a's clock is ahead and a transfer from a brings alice."
        ),
        rules=("ST3", "ST5", "MG1", "DL3", "GP4", "GP5", "GP6", "IN1", IN2),
        nodes=("a", "b", "c"),
        steps=(
            track("a", "sock-alice", LOBBY, "alice"),
            tick("a"),
            drop("a", "b", "heartbeat"),
            deliver("a", "c", "heartbeat"),
            tick("c"),
            deliver("c", "a", "heartbeat"),
            deliver("c", "b", "heartbeat"),
            track("c", "sock-carol", LOBBY, "carol"),
            advance(100),
            tick("a"),
            tick("c"),
            deliver("c", "a", "heartbeat"),
            drop("c", "b", "heartbeat"),
            track("c", "sock-cody", LOBBY, "cody"),
            advance(100),
            tick("a"),
            tick("c"),
            deliver("c", "a", "heartbeat"),
            deliver("c", "b", "heartbeat"),
            tick("b"),
            drop("b", "a", "heartbeat"),
            drop("b", "c", "heartbeat"),
            tick("b"),
            deliver("b", "c", "transfer_req"),
            deliver("c", "b", "transfer_ack"),
            advance(100),
            tick("a"),
            deliver("a", "b", "heartbeat"),
            tick("b"),
            tick("b"),
            deliver("b", "a", "transfer_req"),
            deliver("a", "b", "transfer_ack"),
            flush(),
        ),
    ),
    Scenario(
        name="transfer-choice-dominated-peer-not-asked",
        description=(
            "d missed a's and b's first deltas and hears clocks a {a:2, c:1}, b {b:2} and c "
            "{a:1, c:1}. All three are ahead of d, but c is covered by a, so d's sample asks "
            "only a and b, in replica id order; the two acks complete d's view."
        ),
        rules=("ST3", "GP1", "GP4", "GP5", "GP6", IN2),
        nodes=("a", "b", "c", "d"),
        steps=(
            *meet("a", "b", "c", "d"),
            advance(100),
            track("a", "sock-alice", LOBBY, "alice"),
            tick("a"),
            deliver("a", "c", "heartbeat"),
            drop("a", "b", "heartbeat"),
            drop("a", "d", "heartbeat"),
            track("b", "sock-bob", LOBBY, "bob"),
            tick("b"),
            drop("b", "a", "heartbeat"),
            drop("b", "c", "heartbeat"),
            drop("b", "d", "heartbeat"),
            track("c", "sock-cleo", LOBBY, "cleo"),
            tick("c"),
            deliver("c", "a", "heartbeat"),
            deliver("c", "d", "heartbeat"),
            drop("c", "b", "heartbeat"),
            advance(100),
            track("a", "sock-anna", LOBBY, "anna"),
            tick("a"),
            deliver("a", "d", "heartbeat"),
            drop("a", "b", "heartbeat"),
            drop("a", "c", "heartbeat"),
            track("b", "sock-bea", LOBBY, "bea"),
            tick("b"),
            deliver("b", "d", "heartbeat"),
            drop("b", "a", "heartbeat"),
            drop("b", "c", "heartbeat"),
            tick("d"),  # d's second tick: a sample
            flush(),
        ),
    ),
    Scenario(
        name="transfer-choice-equal-clocks",
        description=(
            "c missed a's first delta; a and b then send c the same clock {a:2}. Both are ahead "
            "and neither covers the other strictly, so c asks only the smaller replica id, a."
        ),
        rules=("ST3", "GP4", "GP5", "GP6", "IN1", IN2),
        nodes=("a", "b", "c"),
        steps=(
            *meet("a", "b", "c"),
            advance(100),
            track("a", "sock-alice", LOBBY, "alice"),
            tick("a"),
            deliver("a", "b", "heartbeat"),
            drop("a", "c", "heartbeat"),
            tick("b"),
            tick("c"),
            advance(100),
            track("a", "sock-anna", LOBBY, "anna"),
            tick("a"),
            deliver("a", "b", "heartbeat"),
            deliver("a", "c", "heartbeat"),
            tick("b"),
            tick("c"),
            advance(100),
            tick("b"),
            flush(),
            tick("c"),
            flush(),
        ),
    ),
    Scenario(
        name="idle-heartbeat-cadence",
        description=(
            "Two quiet nodes heartbeat on their first tick and then exactly every "
            "max_silent_periods ticks. a's untrack at 400 ms is broadcast at once, and so is b's "
            "relay of that removal at 500 ms; each restarts the sender's count. Neither node ever "
            "sees the other down: no silence exceeds 300 ms."
        ),
        rules=("GP2", "DL1", "DL2", "FD1", "FD2", "IN1", IN2),
        nodes=("a", "b"),
        steps=(
            track("a", "sock-alice", LOBBY, "alice"),
            track("a", "sock-ann", LOBBY, "ann"),
            *meet("a", "b"),
            *rounds(3, "a", "b"),
            advance(100),
            untrack("a", "sock-ann", LOBBY, "ann"),
            *ticks("a", "b"),
            flush(),
            *rounds(4, "a", "b"),
        ),
    ),
    Scenario(
        name="duplicate-and-reorder",
        description=(
            "a's two deltas (alice added; then bob added and alice removed) reach b in order, the "
            "first one twice, and c in reverse order. b shows alice then bob; c never shows alice "
            "(her dot is already in c's context when the old delta arrives); both end equal."
        ),
        rules=("MG2", "MG3", "MG4", "MG6", "IN1", IN2),
        faults=("duplicate-reorder",),
        nodes=("a", "b", "c"),
        steps=(
            *meet("a", "b", "c"),
            advance(100),
            track("a", "sock-alice", LOBBY, "alice"),
            tick("a"),
            advance(100),
            track("a", "sock-bob", LOBBY, "bob"),
            untrack("a", "sock-alice", LOBBY, "alice"),
            tick("a"),
            duplicate("a", "b", "heartbeat"),  # the copy of the first delta goes to the back
            deliver("a", "b", "heartbeat"),
            deliver("a", "b", "heartbeat"),
            deliver("a", "b", "heartbeat"),
            deliver("a", "c", "heartbeat", nth=1),  # c: the second delta first
            deliver("a", "c", "heartbeat"),
        ),
    ),
)


# --- generation ----------------------------------------------------------------------------------


def _resolve(scenario: Scenario) -> list[Step]:
    """Replace message selectors and flushes by index steps, following the model's network."""
    cluster = mc.new_cluster(list(scenario.nodes), mh.config_of({"config": scenario.config}))
    resolved: list[Step] = []

    def perform(action: Step) -> None:
        nonlocal cluster
        cluster, _, _ = mh.apply(cluster, action)
        resolved.append(action)

    def in_flight() -> list[list[str]]:
        return list(mh.observation(cluster, mc.Step(), None)["in_flight"])

    for action in scenario.steps:
        if action["do"] == "flush":
            while cluster.in_flight:
                perform({"do": "deliver", "index": 0})
        elif "find" in action:
            source, destination, kind, sender = action["find"]
            matches = [
                index
                for index, (s, d, k, r) in enumerate(in_flight())
                if (s, d) == (source, destination) and kind in (None, k) and sender in (None, r)
            ]
            if len(matches) <= action["nth"]:
                raise ValueError(f"{scenario.name}: no message {action['find']} in flight "
                                 f"(step {len(resolved)}): {in_flight()}")
            perform({"do": action["do"], "index": matches[action["nth"]]})
        else:
            perform(action)
    return resolved


def history_of(scenario: Scenario) -> Json:
    """The vector of one scenario, with the model's observations as ``expect``."""
    unknown = set(scenario.faults) - FAULTS.keys()
    if unknown:
        raise ValueError(f"{scenario.name}: unknown fault classes {sorted(unknown)}")
    history: Json = {
        "format": mh.FORMAT,
        "name": scenario.name,
        "description": scenario.description,
        "rules": list(scenario.rules),
        "faults": list(scenario.faults),
        "nodes": list(scenario.nodes),
        "config": scenario.config,
        "steps": _resolve(scenario),
    }
    history["expect"] = mh.run(history)
    return history


def rendered() -> dict[str, str]:
    """File name -> canonical text, for every scenario."""
    names = [scenario.name for scenario in SCENARIOS]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise ValueError(f"scenario names used twice: {sorted(duplicates)}")
    return {f"{s.name}.json": mh.dumps(history_of(s)) for s in SCENARIOS}


def check(directory: Path = HERE) -> list[str]:
    """The files that are missing, stale, or not produced by any scenario."""
    wanted = rendered()
    present = {path.name for path in directory.glob("*.json")}
    differing = [
        name
        for name, text in wanted.items()
        if name not in present or (directory / name).read_text(encoding="utf-8") != text
    ]
    return sorted(differing + sorted(present - wanted.keys()))


def write(directory: Path = HERE) -> list[str]:
    """Write every vector; return the names of the files that changed."""
    changed = check(directory)
    wanted = rendered()
    for name in changed:
        if name in wanted:
            (directory / name).write_text(wanted[name], encoding="utf-8")
        else:  # a scenario was removed or renamed: its old file must go
            (directory / name).unlink()
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare instead of writing; exit 1 if any file differs")
    args = parser.parse_args(argv)
    if args.check:
        differing = check()
        for name in differing:
            print(f"differs: {name}", file=sys.stderr)
        return 1 if differing else 0
    for name in write():
        print(f"wrote: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
