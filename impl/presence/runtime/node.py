"""A node: the shards of one replica driven by an asyncio timer, wired to the TCP mesh.

The node is the thin, effectful shell around the sans-IO core. It owns

* the clock: every ``broadcast_period`` it ticks every shard with ``time.monotonic`` in integer
  milliseconds (the first tick is jittered by up to a quarter period, so nodes started together
  do not heartbeat in lockstep);
* the routing: topics map to shards by a stable hash (CRC-32 of the UTF-8 topic, modulo the pool
  size, which is why every node of a cluster must use the same pool size); what a shard asks to
  send is encoded once and handed to the transport;
* the boundary checks of local callers: topics, owners and keys are bounded strings and meta is a
  bounded JSON object, checked before anything changes (the core trusts its callers);
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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from presence.core.config import Config
from presence.core.shard import Shard
from presence.core.types import (
    Diff,
    Output,
    Presence,
    PresenceError,
    ReplicaEventKind,
    ReplicaId,
    Status,
)
from presence.runtime.codec import (
    DEFAULT_LIMITS,
    CodecError,
    Limits,
    ShardMessage,
    encode,
)
from presence.runtime.transport import Address, Backoff, Transport, cancel_and_wait

log = logging.getLogger("presence.node")

DiffCallback = Callable[[Diff], None]


class InvalidArgument(PresenceError, ValueError):
    """A topic, owner or key that is not a string within the node's limits."""


class InvalidMeta(InvalidArgument):
    """Meta that is not a JSON object with string keys within the node's size limit."""


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
    ) -> None:
        if not isinstance(name, str) or not name or len(name) > limits.max_name_chars:
            raise InvalidArgument(f"node name must be 1 to {limits.max_name_chars} characters")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise InvalidArgument(f"pool_size must be a positive integer, got {pool_size!r}")
        self.config = config or Config()
        self.replica = ReplicaId(name, time.time_ns() if vsn is None else vsn)
        self.pool_size = pool_size
        self.cluster = cluster
        self.limits = limits
        self.flush_timeout = flush_timeout
        self._rng = rng or random.Random()
        self._shards = [Shard(self.replica, self.config) for _ in range(pool_size)]
        self.transport = Transport(
            node=name, cluster=cluster, pool_size=pool_size, listen=listen, peers=peers,
            peer_names=peer_names, on_message=self._on_message, limits=limits, backoff=backoff,
            rng=self._rng,
        )
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
            raise RuntimeError("a stopped node cannot start again; create a new incarnation")
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
            self._tick()
            next_at += period
            now = loop.time()
            if next_at < now:  # fell behind (a paused process): skip the missed ticks, no burst
                next_at = now + period
            await asyncio.sleep(next_at - now)

    def _tick(self) -> None:
        now = monotonic_ms()
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
        output = self._shards[frame.shard].receive(message, monotonic_ms())
        self._dispatch(frame.shard, output)

    def _dispatch(self, index: int, output: Output) -> None:
        for send in output.sends:
            try:
                data = encode(ShardMessage(index, send.message), self.limits)
            except CodecError as exc:
                log.error("cannot send %s: %s", type(send.message).__name__, exc)
                continue
            self.transport.send(data, send.to)
        for event in output.events:
            level = logging.INFO if event.kind is ReplicaEventKind.UP else logging.WARNING
            log.log(level, "%s: replica %s (vsn %d) is %s",
                    self.name, event.replica.name, event.replica.vsn, event.kind.value)
        self._publish(output.diff)

    # --- subscribers ----------------------------------------------------------------------------

    def subscribe(self, topic: str | None = None) -> Subscription:
        """Diffs from now on, as an async iterator (``async for diff in node.subscribe()``)."""
        subscription = Subscription(self, topic)
        self._subscriptions.add(subscription)
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
        ``InvalidArgument``/``InvalidMeta`` for bad input; nothing changes then.
        """
        self._check_strings(owner=owner, topic=topic, key=key)
        clean = self._clean_meta(meta)
        diff = self._shard(topic).track(owner, topic, key, clean)
        self._publish(diff)
        return str(diff.joins[0].meta["phx_ref"])

    def update(self, owner: str, topic: str, key: str, meta: Mapping[str, Any]) -> str:
        """Replace the meta of a tracked presence; returns its new ref. Raises ``NotTracked``."""
        self._check_strings(owner=owner, topic=topic, key=key)
        clean = self._clean_meta(meta)
        diff = self._shard(topic).update(owner, topic, key, clean)
        self._publish(diff)
        return str(diff.joins[0].meta["phx_ref"])

    def untrack(self, owner: str, topic: str, key: str) -> bool:
        """Stop tracking; returns whether anything was tracked."""
        self._check_strings(owner=owner, topic=topic, key=key)
        diff = self._shard(topic).untrack(owner, topic, key)
        self._publish(diff)
        return bool(diff)

    def untrack_owner(self, owner: str) -> int:
        """Untrack everything ``owner`` tracks on this node; returns how many presences left."""
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
        return self._shard(topic).list(topic)

    def get_by_key(self, topic: str, key: str) -> builtins.list[Presence]:
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
        try:
            text = json.dumps(
                dict(meta), separators=(",", ":"), ensure_ascii=False, allow_nan=False
            )
            size = len(text.encode())
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidMeta(f"meta is not JSON-serialisable: {exc}") from None
        _check_string_keys(meta)
        if size > self.limits.max_meta_bytes:
            raise InvalidMeta(
                f"meta is {size} bytes as JSON, more than the limit of {self.limits.max_meta_bytes}"
            )
        clean: dict[str, Any] = json.loads(text)
        return clean


def _check_string_keys(value: object) -> None:
    # json.dumps would silently turn 1 into "1": a key that would not round-trip is an error.
    # Only called once json.dumps has accepted the value, so there is no cycle to recurse into.
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidMeta(f"meta keys must be strings, got {key!r}")
            _check_string_keys(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_string_keys(item)
