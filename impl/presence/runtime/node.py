"""A node: the shards of one replica driven by an asyncio timer, wired to the TCP mesh.

The node is the thin, effectful shell around the sans-IO core. It owns

* the clock: every ``broadcast_period`` it ticks every shard with ``time.monotonic`` in integer
  milliseconds (the first tick is jittered by up to a quarter period, so nodes started together
  do not heartbeat in lockstep);
* the routing: topics map to shards by a stable hash (CRC-32 of the UTF-8 topic, modulo the pool
  size, which is why every node of a cluster must use the same pool size); what a shard asks to
  send is encoded once and handed to the transport;
* the boundary checks of local callers: topics, owners and keys are bounded strings and meta is a
  bounded JSON object (at most ``MAX_META_DEPTH`` levels deep, so that every peer can decode it),
  checked before anything changes (the core trusts its callers);
* what goes on the wire: a message that cannot be encoded is logged and dropped, never allowed
  to stop the tick loop; a transfer ack too large for one frame goes as several (``split_payload``)
  and a heartbeat whose delta is too large goes without it (peers then catch up by transfer);
* transfer requests: answered only to a peer this node can send to, at most once per requester
  and shard per broadcast period, since each answer encodes the whole state on the event loop;
* owners: ids for callers that have none, and owners tied to an ``async with`` block or to an
  asyncio task, whose presences are untracked when the block exits or the task ends;
* subscribers: every diff (local operation, merge, peer up/down) is passed on to them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import json
import logging
import random
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from presence.core.chunks import drop_entries, split_payload
from presence.core.config import Config
from presence.core.shard import Shard
from presence.core.types import (
    Diff,
    GracefulPermdown,
    Heartbeat,
    Message,
    Output,
    Presence,
    PresenceError,
    ReplicaEventKind,
    ReplicaId,
    Status,
    TransferAck,
    TransferRequest,
)
from presence.runtime.codec import (
    DEFAULT_LIMITS,
    MAX_INT,
    MAX_META_DEPTH,
    CodecError,
    Limits,
    OversizedFrame,
    ShardMessage,
    encode,
)
from presence.runtime.transport import Address, Backoff, Transport, cancel_and_wait

log = logging.getLogger("presence.node")

DiffCallback = Callable[[Diff], None]


class InvalidArgument(PresenceError, ValueError):
    """A topic, owner or key that is not a string within the node's limits."""


class InvalidMeta(InvalidArgument):
    """Meta that is not a JSON object with string keys within the node's size limit and
    ``MAX_META_DEPTH`` levels of nesting."""


class NodeStopped(PresenceError, RuntimeError):
    """A local operation on a node that has stopped: its peers have forgotten it (or will)."""


IDLE_DOWN_PERIODS = 3
"""An accepted connection that carries no frame for this many down periods is dropped: a live
peer heartbeats more often than once per down period."""


def shard_index(topic: str, pool_size: int) -> int:
    """The shard of a topic: stable across processes, machines and languages (G26)."""
    return zlib.crc32(topic.encode("utf-8", "surrogatepass")) % pool_size


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Subscription:
    """An async iterator of the diffs a node reports, optionally restricted to one topic.

    Diffs are queued without bound, so a subscriber must keep consuming; iteration ends when the
    subscription is closed or the node stops.
    """

    def __init__(self, node: Node, topic: str | None) -> None:
        self._node = node
        self.topic = topic
        self._queue: asyncio.Queue[Diff | None] = asyncio.Queue()
        self._closed = False

    def _offer(self, diff: Diff) -> None:
        if self.topic is not None:
            diff = Diff(
                joins=tuple(p for p in diff.joins if p.topic == self.topic),
                leaves=tuple(p for p in diff.leaves if p.topic == self.topic),
            )
            if not diff:
                return
        self._queue.put_nowait(diff)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._node._subscriptions.discard(self)
            self._queue.put_nowait(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Diff:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        diff = await self._queue.get()
        if diff is None:
            raise StopAsyncIteration
        return diff

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Node:
    """One replica of a presence cluster: ``await start()``, track, list, ``await stop()``."""

    def __init__(
        self,
        name: str,
        *,
        listen: Address = ("127.0.0.1", 0),
        peers: Sequence[Address] = (),
        peer_names: Mapping[Address, str] | None = None,
        config: Config | None = None,
        pool_size: int = 1,
        cluster: str = "presence",
        vsn: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        flush_timeout: float = 1.0,
        max_inbound: int = 256,
    ) -> None:
        if not isinstance(name, str) or not name or len(name) > limits.max_name_chars:
            raise InvalidArgument(f"node name must be 1 to {limits.max_name_chars} characters")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise InvalidArgument(f"pool_size must be a positive integer, got {pool_size!r}")
        if vsn is None:
            vsn = time.time_ns()  # below MAX_INT until the year 2262
        if isinstance(vsn, bool) or not isinstance(vsn, int) or not 0 <= vsn <= MAX_INT:
            # Every frame carries the vsn: one the codec cannot encode is a node that never gossips.
            raise InvalidArgument(f"vsn must be an integer from 0 to {MAX_INT}, got {vsn!r}")
        self.config = config or Config()
        self.replica = ReplicaId(name, vsn)
        self.pool_size = pool_size
        self.cluster = cluster
        self.limits = limits
        self.flush_timeout = flush_timeout
        self._rng = rng or random.Random()
        self._shards = [Shard(self.replica, self.config) for _ in range(pool_size)]
        self.transport = Transport(
            node=name, cluster=cluster, pool_size=pool_size, listen=listen, peers=peers,
            peer_names=peer_names, on_message=self._on_message, limits=limits, backoff=backoff,
            rng=self._rng, max_inbound=max_inbound,
            idle_timeout=IDLE_DOWN_PERIODS * self.config.down_ms / 1000,
        )
        self._answered: dict[tuple[int, str], int] = {}
        """When a transfer request was last answered, per (shard, requester name)."""
        self._owner_ids = itertools.count(1)
        self._task_owners: dict[asyncio.Task[Any], str] = {}
        self._subscriptions: set[Subscription] = set()
        self._callbacks: list[DiffCallback] = []
        self._tick_task: asyncio.Task[None] | None = None
        self._running = False
        self._stopped = False
        self.rejected_messages = 0
        """Messages dropped because their shard index or sender did not fit the connection."""

    @property
    def name(self) -> str:
        return self.replica.name

    @property
    def vsn(self) -> int:
        return self.replica.vsn

    @property
    def address(self) -> Address:
        return self.transport.address

    @property
    def running(self) -> bool:
        return self._running

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, dial the peers and start ticking. Raises ``OSError`` if it cannot listen."""
        if self._running:
            return
        if self._stopped:
            raise NodeStopped("a stopped node cannot start again; create a new incarnation")
        await self.transport.start()
        self._running = True
        self._tick_task = asyncio.create_task(self._tick_loop(), name=f"tick {self.name}")

    async def stop(self, graceful: bool = True) -> None:
        """Stop ticking and close the mesh.

        Graceful: first tell every peer this replica is gone for good (GP7), so they drop its
        presences at once instead of after ``down_period``, and give the sends a moment to flush.
        """
        if not self._running:
            return
        self._running = False
        self._stopped = True
        if self._tick_task is not None:
            await cancel_and_wait(self._tick_task)
        if graceful:
            for index, shard in enumerate(self._shards):
                self._dispatch(index, shard.shutdown())
            await self.transport.flush(self.flush_timeout)
        await self.transport.close()
        for subscription in list(self._subscriptions):
            subscription.close()
        log.info("%s stopped%s", self.name, " gracefully" if graceful else "")

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.config.broadcast_period_ms / 1000
        await asyncio.sleep(self._rng.uniform(0, period / 4))
        next_at = loop.time()
        while True:
            try:
                self._tick()
            except Exception:  # a bug must cost one tick, never every later heartbeat
                log.exception("%s: a tick failed", self.name)
            next_at += period
            now = loop.time()
            if next_at < now:  # fell behind (a paused process): skip the missed ticks, no burst
                next_at = now + period
            await asyncio.sleep(next_at - now)

    def _tick(self) -> None:
        now = monotonic_ms()
        if self._answered:
            period = self.config.broadcast_period_ms
            self._answered = {k: t for k, t in self._answered.items() if now - t < period}
        for index, shard in enumerate(self._shards):
            try:
                output = shard.tick(now)
            except Exception:
                log.exception("shard %d failed to tick", index)
                continue
            self._dispatch(index, output)

    # --- messages -------------------------------------------------------------------------------

    def _on_message(self, peer: str, frame: ShardMessage) -> None:
        message = frame.message
        if frame.shard >= self.pool_size:
            self.rejected_messages += 1
            log.warning("dropping a message from %s for shard %d of %d",
                        peer, frame.shard, self.pool_size)
            return
        if message.sender.name != peer:
            # Every message is sent by its sender itself; one naming another node is forged.
            self.rejected_messages += 1
            log.warning("dropping a message from %s that claims to be from %s",
                        peer, message.sender.name)
            return
        now = monotonic_ms()
        if isinstance(message, TransferRequest) and not self._may_answer(frame.shard, peer, now):
            return
        output = self._shards[frame.shard].receive(message, now)
        self._dispatch(frame.shard, output, departure=isinstance(message, GracefulPermdown))

    def _may_answer(self, index: int, peer: str, now: int) -> bool:
        """Whether to answer a transfer request (GP5). An answer costs a full-state encode on the
        event loop, so: only when it can be delivered, and once per requester and shard per
        broadcast period (a requester asks at most once per sample). A dropped request is a lost
        message: the requester asks again at its next sample."""
        if not self.transport.can_send(peer):
            log.debug("ignoring a transfer request from %s: no connection to answer on", peer)
            return False
        last = self._answered.get((index, peer))
        if last is not None and now - last < self.config.broadcast_period_ms:
            log.debug("ignoring a transfer request from %s: answered %d ms ago", peer, now - last)
            return False
        self._answered[(index, peer)] = now
        return True

    def _dispatch(self, index: int, output: Output, departure: bool = False) -> None:
        for send in output.sends:
            try:
                frames = self._encode(index, send.message)
            except Exception as exc:  # never let one message stop the tick loop or a reader
                log.error("cannot send %s: %s", type(send.message).__name__, exc,
                          exc_info=not isinstance(exc, CodecError))
                continue
            for data in frames:
                self.transport.send(data, send.to)
        for event in output.events:
            # A peer coming up or leaving on purpose is news; one falling silent is a warning.
            if departure:
                log.info("%s: replica %s (vsn %d) left", self.name, event.replica.name,
                         event.replica.vsn)
                self.transport.departed(event.replica.name)
                continue
            level = logging.INFO if event.kind is ReplicaEventKind.UP else logging.WARNING
            log.log(level, "%s: replica %s (vsn %d) is %s",
                    self.name, event.replica.name, event.replica.vsn, event.kind.value)
        self._publish(output.diff)

    def _encode(self, index: int, message: Message) -> builtins.list[bytes]:
        """The frames that carry ``message``: one, or several for a transfer ack too large for
        one. Raises ``CodecError`` if it cannot be sent at all."""
        try:
            return [encode(ShardMessage(index, message), self.limits)]
        except CodecError as exc:
            if isinstance(message, TransferAck):
                return self._encode_ack_chunks(index, message, exc)
            if isinstance(message, Heartbeat) and message.delta is not None:
                # The delta is lost, as if the network had dropped it; the clock still tells the
                # peers they are behind, and they catch up by transfer (chunked if need be).
                log.warning("sending a heartbeat without its delta of %d entries: %s",
                            len(message.delta.entries), exc)
                return [encode(ShardMessage(index, replace(message, delta=None)), self.limits)]
            raise

    def _encode_ack_chunks(
        self, index: int, ack: TransferAck, error: CodecError
    ) -> builtins.list[bytes]:
        """A transfer ack as several acks, each a safe chunk of the full state (see
        ``presence.core.chunks``): split until each fits a frame; an entry that cannot be encoded
        even alone is logged and left out, with its dot, so the rest still arrives."""
        payload = ack.payload
        per_chunk = len(payload.entries)
        if isinstance(error, OversizedFrame):  # aim at half the limit: entry sizes vary
            per_chunk = per_chunk * error.limit // (2 * error.size)
        pending = deque(split_payload(payload, max(1, per_chunk)))
        frames: builtins.list[bytes] = []
        skipped = 0
        while pending:
            chunk = pending.popleft()
            try:
                frames.append(encode(ShardMessage(index, replace(ack, payload=chunk)), self.limits))
            except CodecError as exc:
                if len(chunk.entries) > 1:
                    pending.extendleft(reversed(split_payload(chunk, len(chunk.entries) // 2)))
                elif chunk.entries:
                    skipped += 1
                    log.error("leaving an entry of topic %r out of a transfer: %s",
                              chunk.entries[0].topic, exc)
                    pending.appendleft(drop_entries(chunk, chunk.entries))
                else:
                    log.error("leaving part of a context out of a transfer: %s", exc)
        log.info("transfer of %d entries sent as %d frames%s", len(payload.entries), len(frames),
                 f", {skipped} left out" if skipped else "")
        return frames

    # --- subscribers ----------------------------------------------------------------------------

    def subscribe(self, topic: str | None = None) -> Subscription:
        """Diffs from now on, as an async iterator (``async for diff in node.subscribe()``)."""
        subscription = Subscription(self, topic)
        self._subscriptions.add(subscription)
        if self._stopped:  # nothing will ever come: end the iteration at once
            subscription.close()
        return subscription

    def on_diff(self, callback: DiffCallback) -> Callable[[], None]:
        """Call ``callback(diff)`` for every diff; returns a function that unregisters it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def _publish(self, diff: Diff) -> None:
        if not diff:
            return
        for subscription in list(self._subscriptions):
            subscription._offer(diff)
        for callback in list(self._callbacks):
            try:
                callback(diff)
            except Exception:
                log.exception("a diff callback failed")

    # --- local operations -----------------------------------------------------------------------

    def track(self, owner: str, topic: str, key: str, meta: Mapping[str, Any]) -> str:
        """Track ``key`` in ``topic`` for ``owner``; returns the new presence's ref.

        Raises ``AlreadyTracked`` if the owner already tracks that key in that topic, and
        ``InvalidArgument``/``InvalidMeta`` for bad input (meta must be a JSON object of at most
        ``MAX_META_DEPTH`` levels and ``limits.max_meta_bytes`` bytes); nothing changes then.
        Raises ``NodeStopped`` after ``stop()``.
        """
        self._check_running()
        self._check_strings(owner=owner, topic=topic, key=key)
        clean = self._clean_meta(meta)
        diff = self._shard(topic).track(owner, topic, key, clean)
        self._publish(diff)
        return str(diff.joins[0].meta["phx_ref"])

    def update(self, owner: str, topic: str, key: str, meta: Mapping[str, Any]) -> str:
        """Replace the meta of a tracked presence; returns its new ref. Raises ``NotTracked``,
        and the errors of ``track``."""
        self._check_running()
        self._check_strings(owner=owner, topic=topic, key=key)
        clean = self._clean_meta(meta)
        diff = self._shard(topic).update(owner, topic, key, clean)
        self._publish(diff)
        return str(diff.joins[0].meta["phx_ref"])

    def untrack(self, owner: str, topic: str, key: str) -> bool:
        """Stop tracking; returns whether anything was tracked. Raises ``NodeStopped``."""
        self._check_running()
        self._check_strings(owner=owner, topic=topic, key=key)
        diff = self._shard(topic).untrack(owner, topic, key)
        self._publish(diff)
        return bool(diff)

    def untrack_owner(self, owner: str) -> int:
        """Untrack everything ``owner`` tracks on this node; returns how many presences left.
        Raises ``NodeStopped``."""
        self._check_running()
        self._check_strings(owner=owner)
        removed = 0
        for shard in self._shards:
            diff = shard.untrack_owner(owner)
            removed += len(diff.leaves)
            self._publish(diff)
        return removed

    # --- owners ---------------------------------------------------------------------------------

    def new_owner(self) -> str:
        """A fresh owner id, unique across the incarnations of every node: ``name/vsn/n``."""
        return f"{self.name}/{self.vsn}/{next(self._owner_ids)}"

    @contextlib.asynccontextmanager
    async def owner(self, owner: str | None = None) -> AsyncIterator[str]:
        """``async with node.owner() as owner:`` untracks everything ``owner`` holds on exit."""
        owner_id = self.new_owner() if owner is None else owner
        self._check_strings(owner=owner_id)
        try:
            yield owner_id
        finally:
            if not self._stopped:
                self.untrack_owner(owner_id)

    def owner_for_task(self, task: asyncio.Task[Any] | None = None) -> str:
        """The owner tied to ``task`` (default: the current task): when the task ends, however it
        ends, everything that owner tracks is untracked."""
        if task is None:
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("owner_for_task() needs a task outside of one")
        owner = self._task_owners.get(task)
        if owner is None:
            if task.done():
                raise InvalidArgument("the task has already finished")
            owner = self._task_owners[task] = self.new_owner()
            task.add_done_callback(self._task_finished)
        return owner

    def track_task(
        self, task: asyncio.Task[Any], topic: str, key: str, meta: Mapping[str, Any]
    ) -> str:
        """Track a presence that lasts as long as ``task``; returns its ref."""
        return self.track(self.owner_for_task(task), topic, key, meta)

    def _task_finished(self, task: asyncio.Task[Any]) -> None:
        owner = self._task_owners.pop(task, None)
        if owner is not None and not self._stopped:
            self.untrack_owner(owner)

    # --- queries --------------------------------------------------------------------------------

    def list(self, topic: str) -> list[Presence]:
        """The presences of a topic visible at this node, sorted by (key, owner, ref)."""
        _check_query(topic=topic)
        return self._shard(topic).list(topic)

    def get_by_key(self, topic: str, key: str) -> builtins.list[Presence]:
        _check_query(topic=topic, key=key)
        return self._shard(topic).get_by_key(topic, key)

    def topics(self) -> builtins.list[str]:
        """Every topic with at least one visible presence, sorted."""
        return sorted(topic for shard in self._shards for topic in shard.topics())

    def observe(self) -> builtins.list[Presence]:
        """Every visible presence, sorted by (topic, key, owner, ref) (spec ID5)."""
        every = [presence for shard in self._shards for presence in shard.observe()]
        if len(self._shards) == 1:
            return every
        return sorted(every, key=lambda p: (p.topic, p.key, p.owner, str(p.meta["phx_ref"])))

    def peers(self) -> dict[ReplicaId, Status]:
        """Every known peer replica: ``down`` if any shard considers it down."""
        merged: dict[ReplicaId, Status] = {}
        for shard in self._shards:
            for replica, status in shard.peers().items():
                if merged.get(replica) is not Status.DOWN:
                    merged[replica] = status
        return dict(sorted(merged.items()))

    def add_peer(self, address: Address, name: str | None = None) -> None:
        """Dial one more peer; ``name``, if given, is the node name it must answer with."""
        self.transport.add_peer(address, name)

    def cut(self, peers: Iterable[str]) -> None:
        """Drop every frame to and from these peers at this node (a simulated netsplit)."""
        self.transport.cut(peers)

    def heal(self, peers: Iterable[str]) -> None:
        self.transport.heal(peers)

    # --- boundary checks ------------------------------------------------------------------------

    def _shard(self, topic: str) -> Shard:
        return self._shards[shard_index(topic, self.pool_size)]

    def _check_running(self) -> None:
        if self._stopped:
            raise NodeStopped(f"node {self.name} is stopped; start a new Node to track again")

    def _check_strings(self, **values: object) -> None:
        limit = self.limits.max_string_chars
        for what, value in values.items():
            if not isinstance(value, str):
                raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
            if len(value) > limit:
                raise InvalidArgument(f"{what} is longer than {limit} characters")
            try:
                value.encode()
            except UnicodeEncodeError:
                raise InvalidArgument(f"{what} is not valid Unicode text") from None

    def _clean_meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Check meta and return a private deep copy, so a caller mutating its dict later cannot
        change what is tracked, and what peers decode equals what this node stores."""
        if not isinstance(meta, Mapping):
            raise InvalidMeta(f"meta must be a dict, got {type(meta).__name__}")
        # First, without recursion: the depth (which also catches cycles), the keys, and a bound
        # on the work, so json.dumps below can neither recurse too deep nor run for long.
        _check_meta_shape(meta, self.limits.max_meta_bytes)
        try:
            text = json.dumps(
                dict(meta), separators=(",", ":"), ensure_ascii=False, allow_nan=False
            )
            size = len(text.encode())
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidMeta(f"meta is not JSON-serialisable: {exc}") from None
        if size > self.limits.max_meta_bytes:
            raise InvalidMeta(
                f"meta is {size} bytes as JSON, more than the limit of {self.limits.max_meta_bytes}"
            )
        clean: dict[str, Any] = json.loads(text)
        return clean


def _check_query(**values: object) -> None:
    for what, value in values.items():
        if not isinstance(value, str):
            raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")


def _check_meta_shape(meta: Mapping[str, Any], max_bytes: int) -> None:
    """Raise ``InvalidMeta`` for meta nested deeper than ``MAX_META_DEPTH`` (a cycle is), with a
    key that is not a string (json.dumps would silently turn 1 into "1", which does not
    round-trip), or with more values than ``max_bytes`` (each takes at least a byte of JSON)."""
    stack: list[tuple[object, int]] = [(meta, 1)]
    values = 0
    while stack:
        value, depth = stack.pop()
        values += 1
        if values > max_bytes:
            raise InvalidMeta(f"meta is larger than the limit of {max_bytes} bytes")
        if isinstance(value, Mapping):
            for key in value:
                if not isinstance(key, str):
                    raise InvalidMeta(f"meta keys must be strings, got {key!r}")
            children: Iterable[object] = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth > MAX_META_DEPTH:
            raise InvalidMeta(f"meta nests deeper than {MAX_META_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)
