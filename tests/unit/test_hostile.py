"""Regression tests for bugs found by hostile review: each one failed when it was written.

One test per bug, smallest reproduction first. Core tests drive ``Shard``/``State`` by hand; runtime
tests use the in-process harness on loopback; the demo test runs the CLI in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from presence.core.config import Config
from presence.core.shard import Shard
from presence.core.types import Heartbeat, Message, Payload, ReplicaId, TransferRequest
from presence.runtime.codec import Hello, Limits, ShardMessage, decode, encode
from presence.runtime.node import InvalidArgument, InvalidMeta, Node
from presence.runtime.transport import frame_bytes
from tests.unit.runtime_harness import (
    FAST,
    QUICK_BACKOFF,
    connect_mesh,
    eventually,
    mesh,
    raw_connection,
    run,
    view,
)

REPO = Path(__file__).resolve().parents[2]


def _nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = {"x": value}
    return {"deep": value}


def _broadcast(shard: Shard, now: int) -> Message:
    """The heartbeat one tick of ``shard`` broadcasts."""
    return next(send.message for send in shard.tick(now).sends if send.to is None)


# --- core: convergence ----------------------------------------------------------------------------


def test_an_update_whose_heartbeat_is_lost_then_an_untrack_leaves_no_ghost() -> None:
    """IN1. An update consumes one dot and carries the old dot's removal only in the delta of that
    period. If that heartbeat is lost and the new entry is untracked in the next period, the next
    delta re-announces the new dot as removed: the receiver's context becomes 1..3, equal to the
    sender's clock, so no transfer is ever requested, and the old entry stays listed forever."""
    config = Config(broadcast_period_ms=100, max_silent_periods=3, down_period_ms=1000,
                    permdown_period_ms=10_000)
    a = Shard(ReplicaId("a", 1), config)
    c = Shard(ReplicaId("c", 1), config)
    c.track("o", "room", "k", {"v": 1})
    a.receive(_broadcast(c, 0), 0)  # a lists k (dot c.1.1)
    c.update("o", "room", "k", {"v": 2})  # dot 2; dot 1 removed
    _broadcast(c, 100)  # this heartbeat is lost
    c.untrack("o", "room", "k")  # dot 2 removed, dot 3 consumed
    a.receive(_broadcast(c, 200), 200)
    now = 200
    for _ in range(100):  # ten seconds of lossless gossip both ways
        now += 100
        for sender, receiver in ((a, c), (c, a)):
            for send in sender.tick(now).sends:
                for reply in receiver.receive(send.message, now).sends:
                    sender.receive(reply.message, now)
    assert c.list("room") == []
    assert a.list("room") == [], "a ghost of the untracked presence is listed forever"


# --- core and codec: hostile payloads -------------------------------------------------------------


def test_a_huge_context_range_from_a_peer_costs_no_memory_per_dot() -> None:
    """A 170-byte heartbeat whose context holds the range [3, 10**6] of the sender (with a gap
    at 2) made the state expand it into a set of a million ints (a range up to 10**12, which the
    codec accepts, exhausts memory)."""
    shard = Shard(ReplicaId("a", 1), Config())
    evil = ReplicaId("evil", 1)
    shard.receive(Heartbeat(evil, {evil: 0}), 0)
    frame = encode(ShardMessage(0, Heartbeat(evil, {evil: 0}, Payload((), {evil: ((3, 10**6),)}))))
    assert len(frame) < 200
    message = decode(frame)
    assert isinstance(message, ShardMessage)
    tracemalloc.start()
    try:
        shard.receive(message.message, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert shard.state.has_context_dot(evil, 10**6)
    assert not shard.state.has_context_dot(evil, 2)
    assert peak < 5_000_000, f"merging one small frame allocated {peak} bytes"


# --- runtime: what a local caller may track must replicate ----------------------------------------


def test_meta_too_deep_for_peers_to_decode_is_refused_or_replicated() -> None:
    """A meta nested 200 levels deep was accepted by track() and encoded, but every peer's
    decoder refused the frame (recursion limit): the presence never replicated, and every later
    full-state transfer of that shard failed too."""
    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            a, b = nodes["a"], nodes["b"]
            with contextlib.suppress(InvalidMeta):
                a.track("o", "room", "deep", _nested(200))
            a.track("o", "room", "plain", {})
            await eventually(lambda: view(b) == view(a), "b to list what a lists", timeout=3)
    run(body())


def test_meta_too_deep_to_encode_does_not_stop_the_node() -> None:
    """A meta nested 250 levels deep was accepted by track(); encoding the next heartbeat raised
    PydanticSerializationError (not CodecError), which killed the tick task: the node never
    heartbeated again and its peers marked it down."""
    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            a, b = nodes["a"], nodes["b"]
            with contextlib.suppress(InvalidMeta):
                a.track("o", "room", "deep", _nested(250))
            await asyncio.sleep(0.1)
            ref = a.track("o", "room", "plain", {})
            await eventually(lambda: ("room", "plain", "o", ref) in view(b),
                             "b to list a's later presence", timeout=3)
            await asyncio.sleep(FAST.down_ms / 1000 * 1.5)
            assert all(status.value == "up" for status in b.peers().values())
    run(body())


def test_meta_nested_near_the_recursion_limit_raises_invalid_meta() -> None:
    """Around depth 990, json.dumps succeeded but the key check recursed past the interpreter's
    limit: a raw RecursionError instead of the documented InvalidMeta."""
    node = Node("a")
    for depth in range(600, 1100):
        with contextlib.suppress(InvalidMeta):
            node.track("o", "t", f"k{depth}", _nested(depth))


def test_a_full_state_larger_than_one_frame_still_reaches_a_new_peer() -> None:
    """Every presence is within the meta limit, but together they exceed the frame limit: the
    transfer ack could not be encoded ("cannot send TransferAck"), so a peer that joins later
    never sees any of them. With the default limits 300 presences of 60 KB meta do this."""
    limits = Limits(max_frame_bytes=64 * 1024, max_meta_bytes=4 * 1024)

    async def body() -> None:
        a = Node("a", config=FAST, backoff=QUICK_BACKOFF, limits=limits)
        b = Node("b", config=FAST, backoff=QUICK_BACKOFF, limits=limits)
        try:
            await a.start()
            for i in range(60):
                a.track(f"o{i}", "room", f"k{i}", {"blob": "x" * 2000})
            await asyncio.sleep(0.1)
            await b.start()
            await connect_mesh([a, b])
            await eventually(lambda: len(b.list("room")) == 60, "b to list a's 60 presences",
                             timeout=5)
        finally:
            await a.stop(graceful=False)
            await b.stop(graceful=False)
    run(body())


# --- runtime: hostile peers ----------------------------------------------------------------------


def test_transfer_requests_from_an_unreachable_peer_do_not_stall_the_node() -> None:
    """A transfer_req (82 bytes) from any connection made the node encode its whole state (about
    0.5 s for 20 000 presences) on the event loop, even when it had no route to send the answer:
    a handful of requests froze the node for longer than the down period."""
    async def body() -> None:
        a = Node("a", config=FAST, backoff=QUICK_BACKOFF)
        await a.start()
        try:
            for i in range(20_000):
                a.track(f"o{i}", "room", f"k{i}", {"status": "online"})
            await asyncio.sleep(0.2)  # let the first tick broadcast (and encode) the delta
            evil = ReplicaId("evil", 1)
            request = frame_bytes(encode(ShardMessage(0, TransferRequest(evil, {}))))
            _, writer = await raw_connection(a.address, Hello("evil", "presence", 1))
            stalls: list[float] = []

            async def probe() -> None:
                while True:
                    started = time.perf_counter()
                    await asyncio.sleep(0.01)
                    stalls.append(time.perf_counter() - started - 0.01)

            prober = asyncio.create_task(probe())
            writer.write(request * 10)
            await writer.drain()
            await asyncio.sleep(2.0)
            prober.cancel()
            writer.close()
            worst = max(stalls, default=0.0)
            assert worst < 1.0, f"the event loop stalled for {worst:.2f} s"
        finally:
            await a.stop(graceful=False)
    run(body(), timeout=60)


# --- runtime: API misuse -------------------------------------------------------------------------


@pytest.mark.parametrize("vsn", [-1, 2**63, 2**64])
def test_a_vsn_that_cannot_go_on_the_wire_is_refused(vsn: int) -> None:
    """Node(vsn=2**64) (or ``presence node --vsn 99999999999999999999``) started fine and then
    logged "cannot send Heartbeat" every tick: a node that silently never gossips."""
    with pytest.raises(ValueError):
        Node("a", vsn=vsn)


@pytest.mark.parametrize("topic", [5, None, b"room"])
def test_queries_with_a_non_string_topic_raise_invalid_argument(topic: Any) -> None:
    """list() and get_by_key() raised AttributeError from the shard hash."""
    node = Node("a")
    with pytest.raises(InvalidArgument):
        node.list(topic)
    with pytest.raises(InvalidArgument):
        node.get_by_key(topic, "k")


def test_a_subscription_made_after_stop_ends_at_once() -> None:
    """"Iteration ends when the subscription is closed or the node stops": a subscription taken
    after stop() waited forever."""
    async def body() -> None:
        node = Node("a", config=FAST)
        await node.start()
        await node.stop()
        diffs = [diff async for diff in node.subscribe()]
        assert diffs == []
    run(body(), timeout=3)


# --- demo ----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_demo_with_fewer_users_than_nodes_exits_cleanly() -> None:
    """``presence demo --users 1`` crashed with IndexError (churn picks a user of a node that has
    none) and a traceback; it should run or refuse with one line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "impl"), str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "presence", "demo", "--users", "1", "--churn", "1", "--seed", "1",
         "--timeout", "20"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode in (0, 2), done.stderr[-2000:]
    if done.returncode == 2:
        assert done.stderr.count("\n") == 1
