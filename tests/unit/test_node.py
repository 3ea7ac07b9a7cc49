"""In-process nodes over real loopback TCP: convergence, failures, hostile input, owners, meta
checks and the control endpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import pytest

from presence.core.config import Config
from presence.core.types import (
    AlreadyTracked,
    Diff,
    GracefulPermdown,
    Heartbeat,
    NotTracked,
    ReplicaId,
    Status,
    TransferAck,
    TransferRequest,
)
from presence.runtime.codec import MAX_INT, MAX_META_DEPTH, Hello, Limits, ShardMessage, encode
from presence.runtime.control import ControlClient, ControlError, ControlServer
from presence.runtime.node import InvalidArgument, InvalidMeta, Node, NodeStopped, shard_index
from presence.runtime.transport import frame_bytes
from tests.unit.runtime_harness import (
    FAST,
    QUICK_BACKOFF,
    all_see,
    closed_by_peer,
    connect_mesh,
    eventually,
    mesh,
    raw_connection,
    run,
    view,
)


def test_three_nodes_converge_through_track_update_and_untrack() -> None:
    async def body() -> None:
        async with mesh(["a", "b", "c"]) as nodes:
            refs = {}
            for name, node in nodes.items():
                for user in range(5):
                    refs[(name, user)] = node.track(f"{name}-{user}", "room", f"u{user}", {})
            expected = {("room", f"u{user}", f"{name}-{user}", refs[(name, user)])
                        for name in nodes for user in range(5)}
            await eventually(all_see(nodes.values(), expected), "every track everywhere")

            new_ref = nodes["b"].update("b-0", "room", "u0", {"status": "away"})
            assert nodes["c"].untrack("c-1", "room", "u1")
            expected -= {("room", "u0", "b-0", refs[("b", 0)]),
                         ("room", "u1", "c-1", refs[("c", 1)])}
            expected.add(("room", "u0", "b-0", new_ref))
            await eventually(all_see(nodes.values(), expected), "the update and the untrack")
            [updated] = [p for p in nodes["a"].get_by_key("room", "u0") if p.owner == "b-0"]
            assert updated.meta == {"status": "away", "phx_ref": new_ref,
                                    "phx_ref_prev": refs[("b", 0)]}
            assert nodes["a"].topics() == ["room"]
    run(body())


def test_a_graceful_stop_removes_the_nodes_presences_without_waiting() -> None:
    # With a 30 s down period, only the graceful permdown can remove b's presences in time.
    slow_failure_detection = Config(broadcast_period_ms=20, max_silent_periods=5,
                                    down_period_ms=30_000, permdown_period_ms=60_000)
    async def body() -> None:
        async with mesh(["a", "b"], config=slow_failure_detection) as nodes:
            ref = nodes["a"].track("o", "room", "a", {})
            nodes["b"].track("o", "room", "b", {})
            await eventually(lambda: len(nodes["a"].list("room")) == 2, "b's presence at a")
            await nodes["b"].stop(graceful=True)
            await eventually(all_see([nodes["a"]], {("room", "a", "o", ref)}), "b's leave")
            assert nodes["a"].peers() == {}
    run(body())


def test_a_silent_node_is_down_after_the_down_period_and_its_presences_leave() -> None:
    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            subscription = nodes["a"].subscribe()
            ref = nodes["b"].track("o", "room", "k", {"x": 1})
            first = await asyncio.wait_for(anext(subscription), 5)
            assert [(p.owner, p.meta["phx_ref"]) for p in first.joins] == [("o", ref)]
            await nodes["b"].stop(graceful=False)
            leave = await asyncio.wait_for(anext(subscription), 5)
            assert [(p.owner, p.meta["phx_ref"]) for p in leave.leaves] == [("o", ref)]
            assert nodes["a"].list("room") == []
            assert nodes["a"].peers() == {nodes["b"].replica: Status.DOWN}
    run(body())


def test_a_netsplit_hides_each_side_from_the_other_and_a_heal_restores_everything() -> None:
    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            a, b = nodes["a"], nodes["b"]
            ref_a = a.track("o", "room", "a", {})
            ref_b = b.track("o", "room", "b", {})
            both = {("room", "a", "o", ref_a), ("room", "b", "o", ref_b)}
            await eventually(all_see([a, b], both), "both presences")
            a.cut(["b"])
            b.cut(["a"])
            await eventually(lambda: view(a) == {("room", "a", "o", ref_a)}
                             and view(b) == {("room", "b", "o", ref_b)}, "each side alone")
            ref_b2 = b.update("o", "room", "b", {"during": "split"})
            a.heal(["b"])
            b.heal(["a"])
            after = {("room", "a", "o", ref_a), ("room", "b", "o", ref_b2)}
            await eventually(all_see([a, b], after), "the heal, with the change made during it")
    run(body())


def test_hostile_bytes_are_dropped_and_the_node_keeps_working(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            a, b = nodes["a"], nodes["b"]
            before = {("room", "a", "o", a.track("o", "room", "a", {})),
                      ("room", "b", "o", b.track("o", "room", "b", {}))}
            await eventually(all_see([a, b], before), "the first presences")

            # Garbage before any hello, and a length prefix far above the frame limit.
            for junk in (b"\x00\x01garbage\xff" * 10, (2**31).to_bytes(4, "big") + b"{}"):
                reader, writer = await raw_connection(a.address, None)
                writer.write(junk)
                assert await closed_by_peer(reader)
                writer.close()
            # Past the handshake: malformed frames, a forged sender, a shard out of range.
            reader, writer = await raw_connection(a.address, Hello("x", "presence", 1))
            forged = ShardMessage(0, GracefulPermdown(b.replica))
            beyond = ShardMessage(5, Heartbeat(ReplicaId("x", 1), {}))
            for frame in (b"{]", b'{"v": 1, "shard": 0, "msg": {"type": "heartbeat"}}',
                          encode(forged), encode(beyond)):
                writer.write(frame_bytes(frame))
            await writer.drain()
            await eventually(lambda: a.rejected_messages == 2, "the forged frames rejected")

            # Nothing was lost and the node still works.
            assert view(a) == before
            ref = b.track("o2", "room", "b2", {})
            await eventually(all_see([a, b], before | {("room", "b2", "o2", ref)}), "new track")
            assert a.transport.bad_frames == 4
            writer.close()
    with caplog.at_level(logging.WARNING, "presence"):
        run(body())
    assert "claims to be from b" in caplog.text
    assert "for shard 5 of 1" in caplog.text


def test_an_owner_block_untracks_everything_it_holds_on_exit() -> None:
    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            a, b = nodes["a"], nodes["b"]
            async with a.owner() as owner:
                assert owner.startswith(f"a/{a.vsn}/")
                a.track(owner, "room", "k1", {})
                a.track(owner, "lobby", "k1", {})
                await eventually(lambda: len(b.observe()) == 2, "the owner's presences at b")
            assert a.observe() == []
            await eventually(lambda: b.observe() == [], "the owner's leaves at b")

            with pytest.raises(RuntimeError):
                async with a.owner("custom-owner") as custom:
                    a.track(custom, "room", "k2", {})
                    raise RuntimeError("the block failed")
            assert a.observe() == []
    run(body())


def test_a_tasks_presences_are_untracked_when_it_ends_however_it_ends() -> None:
    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            a, b = nodes["a"], nodes["b"]
            release = asyncio.Event()

            async def session(fail: bool) -> None:
                await release.wait()
                if fail:
                    raise ValueError("the session crashed")

            ok, failing, cancelled = (asyncio.create_task(session(f)) for f in (False, True, False))
            for index, task in enumerate((ok, failing, cancelled)):
                a.track_task(task, "room", f"k{index}", {})
            assert len({a.owner_for_task(t) for t in (ok, failing, cancelled)}) == 3
            await eventually(lambda: len(b.list("room")) == 3, "the task presences at b")

            cancelled.cancel()
            await eventually(lambda: len(b.list("room")) == 2, "the cancelled task's leave")
            release.set()
            await asyncio.gather(ok, failing, return_exceptions=True)
            assert a.list("room") == []
            await eventually(lambda: b.list("room") == [], "every task's leave at b")
            with pytest.raises(InvalidArgument, match="already finished"):
                a.track_task(ok, "room", "late", {})
    run(body())


class _NotJson:
    pass


BAD_META: dict[str, Any] = {
    "a list": [1, 2],
    "a string": "status",
    "an integer key": {1: "x"},
    "a nested integer key": {"a": [{"b": {2: "x"}}]},
    "a set": {"a": {1, 2}},
    "an object": {"a": _NotJson()},
    "NaN": {"a": math.nan},
    "infinity": {"a": math.inf},
    "too large": {"a": "x" * (64 * 1024)},
}


@pytest.mark.parametrize("meta", BAD_META.values(), ids=BAD_META.keys())
def test_bad_meta_is_refused_and_changes_nothing(meta: Any) -> None:
    async def body() -> None:
        node = Node("a")
        ref = node.track("o", "room", "k", {"ok": True})
        before = view(node)
        with pytest.raises(InvalidMeta) as error:
            node.track("o", "room", "k2", meta)
        assert isinstance(error.value, ValueError)
        with pytest.raises(InvalidMeta):
            node.update("o", "room", "k", meta)
        assert view(node) == before
        # No dot was consumed by the refused calls: the update takes the removal dot 2 and 3.
        assert node.update("o", "room", "k", {}) == f"a.{node.vsn}.3"
        assert ref == f"a.{node.vsn}.1"
    run(body())


@pytest.mark.parametrize("owner, topic, key", [
    (1, "room", "k"), ("o", None, "k"), ("o", "room", b"k"), ("o", "t" * 1025, "k"),
    ("o", "room", "\ud800"),
])
def test_bad_names_are_refused(owner: Any, topic: Any, key: Any) -> None:
    node = Node("a")
    with pytest.raises(InvalidArgument):
        node.track(owner, topic, key, {})
    assert node.observe() == []


def test_tracked_meta_is_a_private_copy() -> None:
    node = Node("a")
    meta: dict[str, Any] = {"tags": ["x"], "device": ("web", 1)}
    node.track("o", "room", "k", meta)
    meta["tags"].append("changed")
    [presence] = node.list("room")
    assert presence.meta["tags"] == ["x"]
    assert presence.meta["device"] == ["web", 1]  # as every peer decodes it


def test_local_misuse_raises_the_cores_errors() -> None:
    node = Node("a")
    node.track("o", "room", "k", {})
    with pytest.raises(AlreadyTracked):
        node.track("o", "room", "k", {})
    with pytest.raises(NotTracked):
        node.update("o", "room", "other", {})
    assert not node.untrack("o", "room", "other")
    assert node.untrack_owner("nobody") == 0


def test_subscriptions_and_callbacks_report_diffs_optionally_by_topic() -> None:
    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            seen: list[Diff] = []
            unregister = nodes["a"].on_diff(seen.append)
            with nodes["a"].subscribe(topic="lobby") as lobby:
                nodes["b"].track("o", "room", "k", {})
                nodes["b"].track("o", "lobby", "k", {})
                diff = await asyncio.wait_for(anext(lobby), 5)
                assert [p.topic for p in diff.joins] == ["lobby"]
            await eventually(lambda: sum(len(d.joins) for d in seen) == 2, "both joins")
            unregister()
            nodes["b"].untrack_owner("o")
            await eventually(lambda: nodes["a"].observe() == [], "the leaves")
            assert sum(len(d.leaves) for d in seen) == 0
            assert [d async for d in lobby] == []  # closed: iteration ends
    run(body())


def test_topics_are_sharded_by_a_stable_hash_and_sharded_nodes_converge() -> None:
    # CRC-32 of the UTF-8 topic modulo the pool size: pinned, since every node must agree.
    assert [shard_index(t, 8) for t in ("room:lobby", "room:dev", "")] == [5, 1, 0]

    async def body() -> None:
        async with mesh(["a", "b"], pool_size=4) as nodes:
            topics = [f"topic-{i}" for i in range(12)]
            assert len({shard_index(t, 4) for t in topics}) == 4
            expected = {(t, "k", "o", nodes["a"].track("o", t, "k", {})) for t in topics}
            await eventually(all_see(nodes.values(), expected), "every topic at both nodes")
            assert nodes["b"].topics() == sorted(topics)
            assert nodes["a"].untrack_owner("o") == 12
            await eventually(all_see(nodes.values(), set()), "every leave")
    run(body())


def test_the_control_endpoint_serves_every_op() -> None:
    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            a = nodes["a"]
            await eventually(lambda: len(a.peers()) == 1, "b's first heartbeat at a")
            stopped: list[bool] = []
            server = ControlServer(a, ("127.0.0.1", 0), on_shutdown=stopped.append)
            await server.start()
            try:
                async with await ControlClient.connect(server.address) as client:
                    await _exercise_control(client, a)
                    assert await client.call("shutdown", graceful=False) == {}
                    assert stopped == [False]
            finally:
                await server.close()
    run(body())


async def _exercise_control(client: ControlClient, node: Node) -> None:
    ref = (await client.call("track", owner="o", topic="room", key="k", meta={"a": 1}))["ref"]
    assert ref == f"a.{node.vsn}.1"
    ref2 = (await client.call("update", owner="o", topic="room", key="k", meta={"a": 2}))["ref"]
    await client.call("track", owner="o", topic="lobby", key="k")
    listed = (await client.call("list", topic="room"))["presences"]
    assert listed == [{"topic": "room", "key": "k", "owner": "o",
                       "meta": {"a": 2, "phx_ref": ref2, "phx_ref_prev": ref}}]
    assert len((await client.call("list"))["presences"]) == 2
    assert await client.call("untrack", owner="o", topic="lobby", key="k") == {"removed": True}
    assert await client.call("untrack_owner", owner="o") == {"removed": 1}
    peers = await client.call("peers")
    assert [p["name"] for p in peers["peers"]] == ["b"] and peers["connected"] == ["b"]
    assert await client.call("cut", peers=["b"]) == {"cut": ["b"]}
    assert await client.call("heal", peers=["b"]) == {"cut": []}
    info = await client.call("info")
    assert (info["name"], info["total"], info["config"]["down_period_ms"]) == ("a", 0, 400)

    await client.call("track", owner="o", topic="room", key="k")
    refusals: list[tuple[str, dict[str, Any], str]] = [
        ("track", {"owner": "o", "topic": "room", "key": "k"}, "AlreadyTracked"),
        ("update", {"owner": "o", "topic": "room", "key": "x", "meta": {}}, "NotTracked"),
        ("track", {"owner": "o", "topic": "room", "key": "m", "meta": {"x": "y" * 70000}},
         "InvalidMeta"),
        ("track", {"owner": "o", "topic": "room"}, "bad_request"),
        ("track", {"owner": 5, "topic": "room", "key": "k"}, "bad_request"),
        ("cut", {"peers": "b"}, "bad_request"),
        ("explode", {}, "bad_request"),
    ]
    for op, arguments, kind in refusals:
        with pytest.raises(ControlError) as error:
            await client.call(op, **arguments)
        assert error.value.kind == kind, (op, arguments)


# --- hardening: meta depth, the send path, transfers, misuse -------------------------------------


def _nested(levels: int) -> dict[str, Any]:
    """A meta ``levels`` deep: the meta object itself is level 1."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"x": value}
    return value


def test_meta_may_nest_up_to_the_protocol_limit_and_no_deeper() -> None:
    node = Node("a")
    node.track("o", "room", "deepest", _nested(MAX_META_DEPTH))
    node.track("o", "room", "in a list", {"x": [[[]]] * 3})
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    for meta in (_nested(MAX_META_DEPTH + 1), {"x": [_nested(MAX_META_DEPTH - 1)]}, cyclic):
        with pytest.raises(InvalidMeta, match=f"deeper than {MAX_META_DEPTH}"):
            node.track("o", "room", "too deep", meta)
    with pytest.raises(InvalidMeta, match="larger than"):
        node.track("o", "room", "wide", {"x": [0] * (64 * 1024)})
    assert len(node.list("room")) == 2


def test_a_message_that_fails_to_encode_costs_that_message_only(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real_encode = encode
    failures = 0

    def flaky_encode(frame: ShardMessage, limits: Any) -> bytes:
        nonlocal failures
        if failures < 3:
            failures += 1
            raise RuntimeError("an encoder bug")
        return real_encode(frame, limits)

    async def body() -> None:
        async with mesh(["a", "b"]) as nodes:
            a, b = nodes["a"], nodes["b"]
            monkeypatch.setattr("presence.runtime.node.encode", flaky_encode)
            ref = a.track("o", "room", "k", {})
            await eventually(lambda: view(b) == {("room", "k", "o", ref)}, "a's presence at b")
            assert failures == 3
            assert a._tick_task is not None and not a._tick_task.done()
    with caplog.at_level(logging.ERROR, "presence"):
        run(body())
    assert [r.getMessage() for r in caplog.records] == ["cannot send Heartbeat: an encoder bug"] * 3


SMALL_FRAMES = Limits(max_frame_bytes=16 * 1024, max_meta_bytes=4 * 1024)


def test_a_delta_too_large_for_a_frame_arrives_by_transfer_and_the_sender_stays_up(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with mesh(["a", "b"], limits=SMALL_FRAMES) as nodes:
            a, b = nodes["a"], nodes["b"]
            await eventually(lambda: len(b.peers()) == 1, "a up at b")
            expected = {("room", f"k{i}", "o", a.track("o", "room", f"k{i}", {"b": "x" * 2000}))
                        for i in range(30)}
            await eventually(lambda: view(b) == expected, "a's presences at b", timeout=5)
            assert list(b.peers().values()) == [Status.UP]
    with caplog.at_level(logging.INFO, "presence"):
        run(body())
    assert "sending a heartbeat without its delta of 30 entries" in caplog.text
    assert "transfer of 30 entries sent as" in caplog.text


def test_an_entry_too_large_for_any_frame_is_left_out_of_a_transfer_and_the_rest_arrives(
        caplog: pytest.LogCaptureFixture) -> None:
    # The meta limit allows more than a frame holds: a misconfiguration, but not a stuck peer.
    limits = Limits(max_frame_bytes=8 * 1024, max_meta_bytes=16 * 1024)

    async def body() -> None:
        a = Node("a", config=FAST, backoff=QUICK_BACKOFF, limits=limits)
        b = Node("b", config=FAST, backoff=QUICK_BACKOFF, limits=limits)
        try:
            await a.start()
            refs = [a.track("o", "room", f"k{i}", {"b": "x" * 1000}) for i in range(20)]
            a.track("o", "room", "huge", {"b": "x" * 10_000})
            a.untrack("o", "room", "k0")
            await b.start()
            await connect_mesh([a, b])
            expected = {("room", f"k{i}", "o", refs[i]) for i in range(1, 20)}
            await eventually(lambda: view(b) == expected, "every presence but the huge one")
        finally:
            await a.stop(graceful=False)
            await b.stop(graceful=False)
    with caplog.at_level(logging.ERROR, "presence"):
        run(body())
    assert "leaving an entry of topic 'room' out of a transfer" in caplog.text


def test_transfer_requests_are_answered_once_per_requester_per_period(
        caplog: pytest.LogCaptureFixture) -> None:
    slow = Config(broadcast_period_ms=500, max_silent_periods=2, down_period_ms=2000,
                  permdown_period_ms=10_000)

    async def body() -> None:
        async with mesh(["a", "b"], config=slow) as nodes:
            b = nodes["b"]
            acks: list[ShardMessage] = []
            deliver = b.transport.on_message

            def count_acks(peer: str, frame: ShardMessage) -> None:
                if isinstance(frame.message, TransferAck):
                    acks.append(frame)
                deliver(peer, frame)

            b.transport.on_message = count_acks
            request = encode(ShardMessage(0, TransferRequest(b.replica, {})))
            for _ in range(10):
                b.transport.send(request, "a")
            await eventually(lambda: len(acks) == 1
                             and caplog.text.count("ignoring a transfer request from b") == 9,
                             "one answer and nine requests ignored")
            await asyncio.sleep(0.5)  # the next period: answered again
            b.transport.send(request, "a")
            await eventually(lambda: len(acks) == 2, "a second answer")
    with caplog.at_level(logging.DEBUG, "presence.node"):
        run(body())


def test_a_transfer_request_from_a_peer_without_a_route_back_is_ignored(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with mesh(["a"]) as nodes:
            a = nodes["a"]
            _, writer = await raw_connection(a.address, Hello("evil", "presence", 1))
            request = encode(ShardMessage(0, TransferRequest(ReplicaId("evil", 1), {})))
            writer.write(frame_bytes(request))
            await writer.drain()
            await eventually(lambda: "no connection to answer on" in caplog.text, "the drop")
            writer.close()
    with caplog.at_level(logging.DEBUG, "presence.node"):
        run(body())


@pytest.mark.parametrize("vsn", [True, 1.5, "7"])
def test_a_vsn_that_is_not_an_integer_is_refused(vsn: Any) -> None:
    with pytest.raises(InvalidArgument, match="vsn must be an integer"):
        Node("a", vsn=vsn)


def test_the_vsn_range_is_the_wire_range_and_the_default_is_inside_it() -> None:
    assert Node("a", vsn=0).vsn == 0
    assert Node("a", vsn=MAX_INT).vsn == MAX_INT
    assert 0 < Node("a").vsn <= MAX_INT


def test_local_operations_after_stop_raise_node_stopped() -> None:
    async def body() -> None:
        node = Node("a", config=FAST)
        await node.start()
        node.track("o", "room", "k", {})
        await node.stop(graceful=False)
        for operation in (lambda: node.track("o", "room", "k2", {}),
                          lambda: node.update("o", "room", "k", {}),
                          lambda: node.untrack("o", "room", "k"),
                          lambda: node.untrack_owner("o")):
            with pytest.raises(NodeStopped, match="node a is stopped"):
                operation()
        assert [p.key for p in node.list("room")] == ["k"]  # queries still answer
    run(body())


def test_a_peer_configured_in_one_direction_only_replicates_both_ways(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        a = Node("a", config=FAST, backoff=QUICK_BACKOFF)
        await a.start()
        c = Node("c", config=FAST, backoff=QUICK_BACKOFF, peers=[a.address])
        await c.start()
        try:
            refs = {("room", name, "o", node.track("o", "room", name, {}))
                    for name, node in (("a", a), ("c", c))}
            await eventually(all_see([a, c], refs), "each presence at both nodes")
            assert a.transport.connected() == ["c"]
        finally:
            await a.stop(graceful=False)
            await c.stop(graceful=False)
    with caplog.at_level(logging.INFO, "presence"):
        run(body())
    assert "peer c is not in this node's peer list; dialing it back" in caplog.text


def test_control_requests_that_are_not_utf8_or_too_deep_get_bad_request(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        node = Node("a")
        server = ControlServer(node, ("127.0.0.1", 0))
        await server.start()
        try:
            reader, writer = await asyncio.open_connection(*server.address)
            for line in (b'{"op": "info", "x": "\xff"}', b"[" * 100_000,
                         b'{"op": "track", "owner": "o", "topic": "t", "key": "k", "meta": '
                         + b'{"x": ' * 40 + b"1" + b"}" * 41):
                writer.write(line + b"\n")
                await writer.drain()
                reply = json.loads(await reader.readline())
                assert not reply["ok"]
                assert reply["kind"] in ("bad_request", "InvalidMeta"), reply
            writer.close()
        finally:
            await server.close()
    with caplog.at_level(logging.DEBUG, "presence"):
        run(body())
    assert "Traceback" not in caplog.text
