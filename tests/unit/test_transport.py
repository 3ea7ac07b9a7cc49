"""The TCP mesh on loopback: handshakes, framing limits, hostile bytes, cuts and reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import pytest

from presence.core.types import GracefulPermdown, ReplicaId
from presence.runtime.codec import DEFAULT_LIMITS, Hello, Limits, ShardMessage, encode
from presence.runtime.transport import Backoff, Transport, _reachable, frame_bytes
from tests.unit.runtime_harness import (
    QUICK_BACKOFF,
    closed_by_peer,
    eventually,
    raw_connection,
    run,
)

Received = list[tuple[str, ShardMessage]]


def _message(sender: str, shard: int = 0) -> ShardMessage:
    return ShardMessage(shard, GracefulPermdown(ReplicaId(sender, 1)))


def _transport(name: str, received: Received, pool_size: int = 1,
               limits: Limits = DEFAULT_LIMITS) -> Transport:
    return Transport(node=name, cluster="test", pool_size=pool_size, listen=("127.0.0.1", 0),
                     peers=[], on_message=lambda peer, frame: received.append((peer, frame)),
                     backoff=QUICK_BACKOFF, limits=limits)


class Pair:
    """Two transports dialing each other."""

    def __init__(self, a: Transport, b: Transport, got_a: Received, got_b: Received) -> None:
        self.a, self.b, self.got_a, self.got_b = a, b, got_a, got_b


@contextlib.asynccontextmanager
async def connected_pair(limits: Limits = DEFAULT_LIMITS) -> AsyncIterator[Pair]:
    got_a: Received = []
    got_b: Received = []
    a = _transport("a", got_a, limits=limits)
    b = _transport("b", got_b, limits=limits)
    await a.start()
    await b.start()
    a.add_peer(b.address)
    b.add_peer(a.address)
    try:
        await eventually(lambda: a.connected() == ["b"] and b.connected() == ["a"], "connect")
        yield Pair(a, b, got_a, got_b)
    finally:
        await a.close()
        await b.close()


def test_names_are_learnt_from_the_hello_and_frames_flow_both_ways() -> None:
    async def body() -> None:
        async with connected_pair() as pair:
            pair.a.send(encode(_message("a")), to="b")
            pair.b.send(encode(_message("b")))  # broadcast
            await eventually(lambda: pair.got_b == [("a", _message("a"))], "a's frame at b")
            await eventually(lambda: pair.got_a == [("b", _message("b"))], "b's frame at a")
            assert pair.a.inbound() == ["b"]
    run(body())


def test_a_cut_link_drops_frames_both_ways_until_healed() -> None:
    async def body() -> None:
        async with connected_pair() as pair:
            pair.a.cut(["b"])
            pair.a.send(encode(_message("a", 1)))
            pair.b.send(encode(_message("b", 1)))
            # a drops its own frame at once, and b's when it arrives.
            await eventually(lambda: pair.a.cut_frames == 2, "both frames dropped at a")
            pair.a.heal(["b"])
            pair.a.send(encode(_message("a", 2)))
            pair.b.send(encode(_message("b", 2)))
            await eventually(lambda: len(pair.got_a) == 1 and len(pair.got_b) == 1, "frames")
            assert pair.got_a == [("b", _message("b", 2))]
            assert pair.got_b == [("a", _message("a", 2))]
    run(body())


def test_an_oversized_frame_drops_its_connection_only(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with connected_pair(Limits(max_frame_bytes=1000)) as pair:
            reader, writer = await raw_connection(pair.a.address, Hello("x", "test", 1))
            writer.write((5000).to_bytes(4, "big") + b"{" * 100)
            assert await closed_by_peer(reader)
            writer.close()
            # The real peer is unaffected.
            pair.b.send(encode(_message("b")))
            await eventually(lambda: pair.got_a == [("b", _message("b"))], "b's frame")
    with caplog.at_level(logging.WARNING, "presence"):
        run(body())
    assert "frame length 5000 exceeds the limit of 1000 bytes" in caplog.text


def test_a_malformed_frame_is_dropped_and_the_connection_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with connected_pair() as pair:
            _, writer = await raw_connection(pair.a.address, Hello("x", "test", 1))
            for bad in (b"not json", b'{"v": 1, "shard": 0, "msg": {"type": "nope"}}', b""):
                writer.write(frame_bytes(bad))
            writer.write(frame_bytes(encode(_message("x"))))
            await writer.drain()
            await eventually(lambda: pair.got_a == [("x", _message("x"))], "the good frame")
            assert pair.a.bad_frames == 3
            writer.close()
    with caplog.at_level(logging.WARNING, "presence"):
        run(body())
    assert "dropping a bad frame from x: invalid frame" in caplog.text


@pytest.mark.parametrize("first_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                 # garbage: a huge length prefix
    frame_bytes(b"garbage"),                               # a frame that is not a hello
    frame_bytes(encode(_message("x"))),                    # a core message before the hello
], ids=["garbage", "undecodable", "no hello"])
def test_a_connection_without_a_valid_hello_is_refused(
        first_bytes: bytes, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with connected_pair() as pair:
            reader, writer = await raw_connection(pair.a.address, None)
            writer.write(first_bytes)
            assert await closed_by_peer(reader)
            writer.close()
            pair.b.send(encode(_message("b")))
            await eventually(lambda: pair.got_a == [("b", _message("b"))], "b's frame")
    with caplog.at_level(logging.WARNING, "presence"):
        run(body())
    assert "connection from" in caplog.text


def test_a_peer_with_another_pool_size_is_refused_on_both_sides(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        got: Received = []
        a = _transport("a", got, pool_size=2)
        b = _transport("b", got, pool_size=4)
        await a.start()
        await b.start()
        a.add_peer(b.address)
        b.add_peer(a.address)
        try:
            await eventually(lambda: caplog.text.count("pool_size") >= 2, "both refusals")
            assert a.connected() == [] and b.connected() == []
            a.send(encode(_message("a")))
            await asyncio.sleep(0.05)
            assert got == []
        finally:
            await a.close()
            await b.close()
    with caplog.at_level(logging.WARNING, "presence"):
        run(body())
    assert "b has pool_size 4, this node 2" in caplog.text


def test_a_peer_answering_with_an_unexpected_name_is_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        got: Received = []
        a = _transport("a", got)
        b = _transport("b", got)
        await a.start()
        await b.start()
        a.add_peer(b.address, "c")
        try:
            await eventually(lambda: "expected node 'c', found 'b'" in caplog.text, "refusal")
            assert a.connected() == []
        finally:
            await a.close()
            await b.close()
    with caplog.at_level(logging.WARNING, "presence"):
        run(body())


def test_a_restarted_peer_is_redialed() -> None:
    async def body() -> None:
        got_a: Received = []
        got_b: Received = []
        a = _transport("a", got_a)
        b = _transport("b", got_b)
        await b.start()
        address = b.address
        await a.start()
        a.add_peer(address)
        await eventually(lambda: a.connected() == ["b"], "connect")
        await b.close()
        await eventually(lambda: a.connected() == [], "disconnect")
        b = Transport(node="b", cluster="test", pool_size=1, listen=address, peers=[],
                      on_message=lambda peer, frame: got_b.append((peer, frame)))
        await b.start()
        try:
            await eventually(lambda: a.connected() == ["b"], "reconnect")
            a.send(encode(_message("a")))
            await eventually(lambda: got_b == [("a", _message("a"))], "a frame after restart")
        finally:
            await a.close()
            await b.close()
    run(body())


def test_backoff_grows_exponentially_with_jitter_up_to_its_cap() -> None:
    backoff = Backoff(initial=0.1, maximum=2.0, factor=2.0)
    rng = random.Random(7)
    for failures, ceiling in [(0, 0.1), (1, 0.2), (3, 0.8), (5, 2.0), (500, 2.0)]:
        delays = {backoff.delay(failures, rng) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1
    with pytest.raises(ValueError):
        Backoff(initial=3.0, maximum=2.0)


def test_a_peer_that_is_dialed_in_one_direction_only_is_dialed_back(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        got_a: Received = []
        got_c: Received = []
        a = _transport("a", got_a)
        c = _transport("c", got_c)
        await a.start()
        await c.start()
        c.add_peer(a.address)  # a is not told about c
        try:
            await eventually(lambda: a.connected() == ["c"] and c.connected() == ["a"],
                             "links both ways")
            a.send(encode(_message("a")))
            await eventually(lambda: got_c == [("a", _message("a"))], "a's frame at c")
        finally:
            await a.close()
            await c.close()
    with caplog.at_level(logging.INFO, "presence"):
        run(body())
    assert caplog.text.count("dialing it back") == 1


def test_a_dial_back_is_dropped_when_a_configured_dialer_reaches_the_same_peer() -> None:
    async def body() -> None:
        a = _transport("a", [])
        c = _transport("c", [])
        await a.start()
        await c.start()
        c.add_peer(a.address)
        try:
            await eventually(lambda: a.connected() == ["c"], "the dial-back")
            # Configured later under another spelling of its address: one dialer remains.
            a.add_peer(("localhost", c.address[1]))
            await eventually(lambda: len(a._outbound) == 1 and a.connected() == ["c"],
                             "only the configured dialer")
            assert not a._outbound[0].learnt
        finally:
            await a.close()
            await c.close()
    run(body())


def test_a_frame_goes_once_to_a_peer_reached_by_two_dialers() -> None:
    async def body() -> None:
        got: Received = []
        a = _transport("a", [])
        b = _transport("b", got)
        await a.start()
        await b.start()
        a.add_peer(b.address)
        a.add_peer(("localhost", b.address[1]))
        try:
            await eventually(lambda: all(o.queue is not None for o in a._outbound), "both up")
            a.send(encode(_message("a", 1)))
            a.send(encode(_message("a", 2)), to="b")
            await eventually(lambda: len(got) >= 2, "the frames")
            await a.flush(1.0)
            assert got == [("a", _message("a", 1)), ("a", _message("a", 2))]
        finally:
            await a.close()
            await b.close()
    run(body())


def test_dial_back_addresses_replace_hosts_that_name_no_machine_from_here() -> None:
    class Writer:
        def __init__(self, remote: str) -> None:
            self.remote = remote

        def get_extra_info(self, name: str) -> tuple[str, int]:
            return (self.remote, 40000)

    def reachable(listen: tuple[str, int], remote: str) -> tuple[str, int]:
        return _reachable(listen, Writer(remote))  # type: ignore[arg-type]

    assert reachable(("0.0.0.0", 7001), "10.0.0.5") == ("10.0.0.5", 7001)
    assert reachable(("::", 7001), "fe80::1") == ("fe80::1", 7001)
    assert reachable(("127.0.0.1", 7001), "10.0.0.5") == ("10.0.0.5", 7001)
    assert reachable(("127.0.0.1", 7001), "127.0.0.1") == ("127.0.0.1", 7001)
    assert reachable(("10.0.0.7", 7001), "10.0.0.5") == ("10.0.0.7", 7001)
    assert reachable(("node-7.internal", 7001), "10.0.0.5") == ("node-7.internal", 7001)


def test_inbound_connections_beyond_the_cap_are_refused() -> None:
    async def body() -> None:
        a = Transport(node="a", cluster="test", pool_size=1, listen=("127.0.0.1", 0), peers=[],
                      on_message=lambda peer, frame: None, max_inbound=2)
        await a.start()
        try:
            first = [await raw_connection(a.address, Hello(f"x{i}", "test", 1)) for i in range(2)]
            reader, writer = await raw_connection(a.address, None)
            assert await closed_by_peer(reader)
            assert a.refused_connections == 1
            for _, w in first:
                w.close()
            writer.close()
            await eventually(lambda: a.inbound() == [], "the first two closed")
            _, again = await raw_connection(a.address, Hello("x", "test", 1))
            await eventually(lambda: a.inbound() == ["x"], "a new connection accepted")
            again.close()
        finally:
            await a.close()
    run(body())


def test_an_idle_inbound_connection_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        got: Received = []
        a = Transport(node="a", cluster="test", pool_size=1, listen=("127.0.0.1", 0), peers=[],
                      on_message=lambda peer, frame: got.append((peer, frame)),
                      idle_timeout=0.3)
        await a.start()
        try:
            reader, writer = await raw_connection(a.address, Hello("x", "test", 1))
            for _ in range(4):  # frames keep it open past the idle timeout
                writer.write(frame_bytes(encode(_message("x"))))
                await asyncio.sleep(0.1)
            await eventually(lambda: len(got) == 4, "the frames")
            assert a.inbound() == ["x"]
            assert await closed_by_peer(reader, timeout=3.0)
            writer.close()
        finally:
            await a.close()
    with caplog.at_level(logging.INFO, "presence"):
        run(body())
    assert "dropping the connection from x: no frame for 0.3 s" in caplog.text


def test_a_dial_back_follows_a_peer_that_restarts_elsewhere() -> None:
    async def body() -> None:
        a = _transport("a", [])
        await a.start()
        old = _transport("c", [])
        await old.start()
        old.add_peer(a.address)
        new = _transport("c", [])
        try:
            await eventually(lambda: a.connected() == ["c"], "the first dial-back")
            await old.close()
            await new.start()
            new.add_peer(a.address)
            await eventually(lambda: [o.address for o in a._outbound] == [new.address]
                             and a.connected() == ["c"], "the dial-back to the new address")
        finally:
            await a.close()
            await new.close()
    run(body())
