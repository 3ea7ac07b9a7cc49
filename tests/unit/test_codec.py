"""The wire codec: every message round-trips, and every malformed frame is rejected with a clear
``CodecError`` before it can reach a shard."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from presence.core.types import (
    DotRanges,
    Entry,
    GracefulPermdown,
    Heartbeat,
    Message,
    Payload,
    ReplicaId,
    TransferAck,
    TransferRequest,
)
from presence.runtime.codec import (
    MAX_META_DEPTH,
    PROTOCOL_VERSION,
    REF_ALLOWANCE_BYTES,
    CodecError,
    Hello,
    Limits,
    OversizedFrame,
    ShardMessage,
    decode,
    encode,
    meta_depth_exceeds,
)

A = ReplicaId("a", 1)
B = ReplicaId("b", 7)

# --- round trips --------------------------------------------------------------------------------

replicas = st.builds(ReplicaId, st.sampled_from(["a", "b", "c", "nœud"]),
                     st.integers(0, 2**63 - 1))
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8) | \
    st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)
metas = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


def _to_ranges(counters: set[int]) -> DotRanges:
    ranges: list[tuple[int, int]] = []
    for counter in sorted(counters):
        if ranges and ranges[-1][1] == counter - 1:
            ranges[-1] = (ranges[-1][0], counter)
        else:
            ranges.append((counter, counter))
    return tuple(ranges)


@st.composite
def payloads(draw: st.DrawFn) -> Payload:
    context: dict[ReplicaId, DotRanges] = {}
    entries: list[Entry] = []
    for replica in draw(st.lists(replicas, max_size=3, unique=True)):
        counters = draw(st.sets(st.integers(1, 40), max_size=8))
        context[replica] = _to_ranges(counters)
        for counter in draw(st.sets(st.sampled_from(sorted(counters)), max_size=4)
                            if counters else st.just(set[int]())):
            entries.append(Entry(replica, counter, draw(st.text(max_size=6)),
                                 draw(st.text(max_size=6)), draw(st.text(max_size=6)),
                                 draw(metas)))
    return Payload(entries=tuple(entries), context=context)


clocks = st.dictionaries(replicas, st.integers(0, 2**63 - 1), max_size=4)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Heartbeat, replicas, clocks, st.none() | payloads()),
    st.builds(TransferRequest, replicas, clocks),
    st.builds(TransferAck, replicas, payloads()),
    st.builds(GracefulPermdown, replicas),
)


@given(st.integers(0, 65535), messages)
def test_every_message_round_trips(shard: int, message: Message) -> None:
    frame = ShardMessage(shard, message)
    assert decode(encode(frame)) == frame


def test_hello_round_trips() -> None:
    hello = Hello(node="n1", cluster="prod", pool_size=8)
    assert decode(encode(hello)) == hello
    assert hello.protocol == PROTOCOL_VERSION


def test_a_frame_is_a_versioned_envelope_with_the_shard_index() -> None:
    wire = json.loads(encode(ShardMessage(3, GracefulPermdown(A))))
    assert wire == {"v": 1, "shard": 3, "msg": {"type": "graceful_permdown", "sender": ["a", 1]}}


# --- rejections ---------------------------------------------------------------------------------


def _frame(msg: dict[str, Any], shard: int | None = 0, version: int = 1) -> bytes:
    return json.dumps({"v": version, "shard": shard, "msg": msg}).encode()


def _entry(counter: int, **changes: Any) -> dict[str, Any]:
    return {"counter": counter, "topic": "t", "owner": "o", "key": "k", "meta": {}, **changes}


def _ack(*blocks: dict[str, Any]) -> bytes:
    return _frame({"type": "transfer_ack", "sender": ["a", 1], "payload": {"context": blocks}})


def _block(ranges: list[list[int]], entries: list[dict[str, Any]] | None = None,
           replica: list[Any] | None = None) -> dict[str, Any]:
    return {"replica": replica or ["b", 7], "ranges": ranges, "entries": entries or []}


def _heartbeat(**changes: Any) -> dict[str, Any]:
    return {"type": "heartbeat", "sender": ["a", 1], "clock": [["a", 1, 3]], "delta": None,
            **changes}


HELLO = {"type": "hello", "node": "n1", "cluster": "c", "pool_size": 1, "protocol": 1}

REJECTED = {
    "not JSON": (b"{nope", "Invalid JSON"),
    "not UTF-8": (b"\xff\xfe\x00", "Invalid JSON"),
    "empty": (b"", "Invalid JSON"),
    "not an object": (b"[1, 2]", "should be an object"),
    "unsupported version": (_frame(HELLO, shard=None, version=2), "unsupported protocol version 2"),
    "version as a string": (b'{"v": "1", "msg": {}}', "v"),
    "unknown type": (_frame({"type": "gossip", "sender": ["a", 1]}), "'gossip'"),
    "missing type": (_frame({"sender": ["a", 1]}), "Unable to extract tag"),
    "unknown field": (_frame({"type": "graceful_permdown", "sender": ["a", 1], "x": 1}),
                      "Extra inputs"),
    "missing field": (_frame({"type": "transfer_req", "sender": ["a", 1]}), "clock"),
    "sender not a pair": (_frame({"type": "graceful_permdown", "sender": "a"}), "sender"),
    "vsn as a string": (_frame({"type": "graceful_permdown", "sender": ["a", "1"]}), "sender"),
    "vsn as a bool": (_frame({"type": "graceful_permdown", "sender": ["a", True]}), "sender"),
    "negative vsn": (_frame({"type": "graceful_permdown", "sender": ["a", -1]}), "sender"),
    "vsn over 64 bits": (_frame({"type": "graceful_permdown", "sender": ["a", 2**63]}), "sender"),
    "empty node name": (_frame({"type": "graceful_permdown", "sender": ["", 1]}),
                        "must not be empty"),
    "node name too long": (_frame({"type": "graceful_permdown", "sender": ["x" * 256, 1]}),
                           "longer than 255"),
    "lone surrogate in a name": (b'{"v":1,"shard":0,"msg":{"type":"graceful_permdown",'
                                 b'"sender":["\\ud800",1]}}', "Invalid JSON"),
    "core message without a shard": (_frame({"type": "graceful_permdown", "sender": ["a", 1]},
                                            shard=None), "needs a shard index"),
    "hello with a shard": (_frame(HELLO, shard=0), "carries no shard index"),
    "negative shard": (_frame({"type": "graceful_permdown", "sender": ["a", 1]}, shard=-1),
                       "shard"),
    "hello with pool_size 0": (_frame({**HELLO, "pool_size": 0}, shard=None), "pool_size"),
    "hello with an empty cluster": (_frame({**HELLO, "cluster": ""}, shard=None),
                                    "must not be empty"),
    "negative clock counter": (_frame(_heartbeat(clock=[["a", 1, -1]])), "clock"),
    "replica twice in a clock": (_frame(_heartbeat(clock=[["a", 1, 1], ["a", 1, 2]])),
                                 "appears twice in the clock"),
    "clock entry of the wrong length": (_frame(_heartbeat(clock=[["a", 1]])), "clock"),
    "counter 0 in a range": (_ack(_block([[0, 2]])), "greater than or equal to 1"),
    "range with first > last": (_ack(_block([[5, 3]])), "first > last"),
    "overlapping ranges": (_ack(_block([[1, 4], [3, 6]])), "sorted and disjoint"),
    "unsorted ranges": (_ack(_block([[5, 6], [1, 2]])), "sorted and disjoint"),
    "range of three numbers": (_ack(_block([[1, 2, 3]])), "ranges"),
    "entry outside the context": (_ack(_block([[1, 2]], [_entry(3)])),
                                  "outside the payload's context"),
    "entry counter 0": (_ack(_block([[1, 2]], [_entry(0)])), "greater than or equal to 1"),
    "two entries with one dot": (_ack(_block([[1, 2]], [_entry(1), _entry(1, key="j")])),
                                 "two entries with the dot counter 1"),
    "replica twice in a context": (_ack(_block([[1, 1]]), _block([[2, 2]])),
                                   "appears twice in the payload's context"),
    "topic too long": (_ack(_block([[1, 1]], [_entry(1, topic="t" * 1025)])),
                       "longer than 1024"),
    "owner not a string": (_ack(_block([[1, 1]], [_entry(1, owner=5)])), "owner"),
    "meta not an object": (_ack(_block([[1, 1]], [_entry(1, meta=[1, 2])])), "meta"),
    "meta with NaN": (_ack(_block([[1, 1]], [_entry(1, meta={"x": float("nan")})])),
                      "not plain JSON"),
    "meta too large": (_ack(_block([[1, 1]], [_entry(1, meta={
        "x": "y" * (64 * 1024 + REF_ALLOWANCE_BYTES)})])), "exceeds"),
    "delta of the wrong shape": (_frame(_heartbeat(delta={"entries": []})), "delta"),
}


@pytest.mark.parametrize("data, message", REJECTED.values(), ids=REJECTED.keys())
def test_malformed_frames_are_rejected_with_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(CodecError, match="invalid frame") as error:
        decode(data)
    assert message in str(error.value)


def test_the_frame_size_is_checked_before_parsing() -> None:
    limits = Limits(max_frame_bytes=100)
    # Not even JSON: only a check made before parsing can report the size.
    with pytest.raises(CodecError, match="frame of 101 bytes exceeds the limit of 100"):
        decode(b"x" * 101, limits)
    assert decode(encode(GracefulPermdownFrame, limits), limits) == GracefulPermdownFrame


GracefulPermdownFrame = ShardMessage(0, GracefulPermdown(A))


def test_limits_are_configurable() -> None:
    limits = Limits(max_string_chars=3, max_name_chars=2, max_meta_bytes=10)
    ok = _ack(_block([[1, 1]], [_entry(1, topic="abc", meta={"a": 1})], replica=["bb", 7]))
    decode(ok, limits)
    with pytest.raises(CodecError, match="longer than 3"):
        decode(_ack(_block([[1, 1]], [_entry(1, topic="abcd")])), limits)
    with pytest.raises(CodecError, match="longer than 2"):
        decode(_ack(_block([[1, 1]], replica=["bbb", 7])), limits)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Limits(max_frame_bytes=0)


def test_encoding_checks_what_decoding_will() -> None:
    stray = Payload(entries=(Entry(B, 1, "t", "o", "k", {}),), context={A: ((1, 1),)})
    with pytest.raises(CodecError, match=r"missing from its context: b\.7"):
        encode(ShardMessage(0, TransferAck(A, stray)))
    outside = Payload(entries=(Entry(B, 5, "t", "o", "k", {}),), context={B: ((1, 1),)})
    with pytest.raises(CodecError, match="outside the payload's context"):
        encode(ShardMessage(0, TransferAck(A, outside)))
    surrogate = Payload(entries=(Entry(B, 1, "\ud800", "o", "k", {}),), context={B: ((1, 1),)})
    with pytest.raises(CodecError, match="not valid Unicode"):
        encode(ShardMessage(0, TransferAck(A, surrogate)))
    big = Payload(entries=(Entry(B, 1, "t", "o", "k", {"x": "y" * 200}),), context={B: ((1, 1),)})
    with pytest.raises(CodecError, match="exceeds the limit of 150"):
        encode(ShardMessage(0, TransferAck(A, big)), Limits(max_frame_bytes=150))


def _deep(levels: int) -> dict[str, Any]:
    """A meta ``levels`` deep: the meta object itself is level 1."""
    value: Any = 1
    for level in range(levels - 1):  # objects and arrays alternate
        value = [value] if level % 2 else {"x": value}
    return {"x": value}


def test_meta_nesting_is_bounded_by_the_protocol_on_both_sides() -> None:
    assert not meta_depth_exceeds(_deep(MAX_META_DEPTH))
    assert meta_depth_exceeds(_deep(MAX_META_DEPTH + 1))
    assert not meta_depth_exceeds([[1]], 2) and meta_depth_exceeds([[[1]]], 2)
    ok = ShardMessage(0, TransferAck(A, Payload((Entry(B, 1, "t", "o", "k", _deep(32)),),
                                                {B: ((1, 1),)})))
    assert decode(encode(ok)) == ok
    deep = {"x": [_deep(MAX_META_DEPTH)]}
    frame = _ack(_block([[1, 1]], [_entry(1, meta=deep)]))
    with pytest.raises(CodecError, match=f"meta nests deeper than {MAX_META_DEPTH} levels"):
        decode(frame)
    refused = Payload((Entry(B, 1, "t", "o", "k", deep),), {B: ((1, 1),)})
    with pytest.raises(CodecError, match="nests deeper"):
        encode(ShardMessage(0, TransferAck(A, refused)))


def test_an_oversized_frame_reports_its_size_for_splitting() -> None:
    big = Payload(entries=(Entry(B, 1, "t", "o", "k", {"x": "y" * 200}),), context={B: ((1, 1),)})
    with pytest.raises(OversizedFrame) as error:
        encode(ShardMessage(0, TransferAck(A, big)), Limits(max_frame_bytes=150))
    assert error.value.limit == 150 and error.value.size > 200


def test_a_hello_may_carry_the_senders_listen_address() -> None:
    hello = Hello(node="n1", cluster="prod", pool_size=8, listen=("10.0.0.1", 7001))
    assert decode(encode(hello)) == hello
    # Without one, the field is left out: the hello of a node that does not advertise.
    assert "listen" not in json.loads(encode(Hello(node="n1", cluster="prod", pool_size=8)))["msg"]
    for bad in (["", 7001], ["h", 0], ["h", 70000], ["h" * 256, 1]):
        frame = json.dumps({"v": 1, "msg": {"type": "hello", "node": "n", "cluster": "c",
                                            "pool_size": 1, "protocol": 1, "listen": bad}})
        with pytest.raises(CodecError):
            decode(frame.encode())
