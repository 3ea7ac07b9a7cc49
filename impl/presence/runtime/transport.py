"""A TCP full mesh between the configured peers, carrying length-prefixed frames.

Every frame is a 4-byte big-endian length followed by that many bytes of encoded JSON (see
:mod:`presence.runtime.codec`). Each node dials every configured peer address and keeps one
outbound connection per peer for everything it sends; the connections it accepts are only read.
Both directions open with a ``hello`` frame (the dialer's first, then the acceptor's reply), which
names the node at the other end and lets either side refuse a peer of another cluster, protocol
version or pool size (G18) before any core message flows. The hello also gives the address the
sender listens on: a node accepting a peer it does not dial yet (configured in one direction only)
dials it back, so that every link carries frames both ways.

What goes wrong is contained to the smallest unit that can be dropped:

* a frame that fails to decode is logged and dropped; the connection and later frames are kept;
* a length prefix above the frame limit cannot be skipped safely (its bytes may never come), so
  the connection is dropped and logged; the peer redials;
* an exception in the frame handler is logged; reading goes on;
* accepted connections are capped (``max_inbound``), and one that carries no frame for
  ``idle_timeout`` seconds after its handshake is dropped (a live peer heartbeats regularly).

Frames to a peer that is not connected are dropped rather than queued: the gossip protocol repairs
lost deltas by clock comparison and transfer, and a backlog of stale heartbeats only delays it.

``cut(names)`` and ``heal(names)`` simulate a network partition at this node: frames to and from a
cut peer are dropped while the connections stay up, so a heal takes effect at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import struct
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from presence.runtime.codec import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    CodecError,
    Hello,
    Limits,
    ShardMessage,
    decode,
    encode,
)

log = logging.getLogger("presence.transport")

LENGTH = struct.Struct(">I")
MAX_HELLO_BYTES = 4096
"""A hello is small: a connection whose first length prefix is larger is garbage, and is dropped
at once instead of being held open until the handshake times out."""
Address = tuple[str, int]
MessageHandler = Callable[[str, ShardMessage], None]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential reconnect delays with jitter, in seconds.

    The n-th consecutive failure waits a uniformly random time in ``[d/2, d]`` where
    ``d = min(maximum, initial * factor**n)``: the jitter keeps a restarted cluster from redialing
    in lockstep, the cap bounds how long a healed link stays unused.
    """

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1:
            raise ValueError(f"invalid backoff {self!r}")

    def delay(self, failures: int, rng: random.Random) -> float:
        ceiling = min(self.maximum, self.initial * self.factor ** min(failures, 64))
        return rng.uniform(ceiling / 2, ceiling)


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HandshakeError(Exception):
    """A peer that cannot join this node's mesh (wrong cluster, pool size, protocol, or itself)."""


class FrameTooLarge(Exception):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame length {length} exceeds the limit of {limit} bytes")


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int) -> bytes:
    """Read one frame body. Raises ``FrameTooLarge`` for a length prefix above the limit (the
    connection cannot be resynchronised after it) and ``IncompleteReadError`` at end of stream."""
    (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    if length > max_frame_bytes:
        raise FrameTooLarge(length, max_frame_bytes)
    return await reader.readexactly(length)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end, without swallowing a cancellation of the caller
    (as ``suppress(CancelledError)`` around ``await task`` would)."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


def frame_bytes(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


class _Outbound:
    """The dialer of one peer address and, once connected, its send queue.

    ``learnt``: dialed back because that peer dialed this node first, not configured.
    """

    def __init__(self, transport: Transport, address: Address, expected: str | None,
                 learnt: bool = False) -> None:
        self.transport = transport
        self.address = address
        self.expected = expected
        self.learnt = learnt
        self.name = expected
        """The peer's node name: configured, or learnt from its hello (kept across reconnects)."""
        self.queue: asyncio.Queue[bytes] | None = None
        """Present while a handshaken connection is up."""
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        """Set before the task is cancelled: a cancellation that Python 3.11's ``wait_for``
        swallows (when the awaited future completes at the same moment) still ends the loop."""
        self._last_failure: str | None = None
        self.expected_down = True
        """Failures are routine (logged at info) until the first handshake, and again after the
        peer announced its departure; otherwise a lost peer is a warning."""
        self._failures = 0
        """Consecutive attempts since the last successful handshake: the backoff exponent."""
        self._dropped = 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"dial {format_address(self.address)}")

    def offer(self, data: bytes) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self._dropped += 1
            if self._dropped == 1:
                log.warning("send queue to %s is full; dropping frames", self.name)

    def _failed(self, reason: str, refused_handshake: bool = False) -> None:
        """Log a connection failure once per distinct reason, so a dead peer does not flood the
        log while it is redialed."""
        where = format_address(self.address)
        if self.name is not None:
            where = f"{self.name} ({where})"
        if reason != self._last_failure:
            # A peer that is not there yet (or left) is routine; a wrong peer never is.
            quiet = self.expected_down and not refused_handshake
            level = logging.INFO if quiet else logging.WARNING
            log.log(level, "peer %s: %s; retrying", where, reason)
        else:
            log.debug("peer %s: %s", where, reason)
        self._last_failure = reason

    async def _run(self) -> None:
        while not self.stopping:
            try:
                await self._connect_and_send()
            except Exception as exc:  # any failure of one connection only means: redial
                self._failed(_describe_error(exc), isinstance(exc, HandshakeError | CodecError))
            self.wake.clear()
            delay = self.transport.backoff.delay(self._failures, self.transport.rng)
            self._failures += 1
            # A hello from this peer on an inbound connection means it is back: redial now.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.wake.wait()

    async def _connect_and_send(self) -> None:
        transport = self.transport
        async with asyncio.timeout(transport.handshake_timeout):
            reader, writer = await asyncio.open_connection(*self.address)
        try:
            writer.write(frame_bytes(transport.hello_bytes))
            async with asyncio.timeout(transport.handshake_timeout):
                reply = await read_frame(reader, MAX_HELLO_BYTES)
            hello = decode(reply, transport.limits)
            if not isinstance(hello, Hello):
                raise HandshakeError("first frame was not a hello")
            transport.check_hello(hello)
            if self.expected is not None and hello.node != self.expected:
                raise HandshakeError(f"expected node {self.expected!r}, found {hello.node!r}")
            if self.name is not None and self.name != hello.node:
                log.warning("peer at %s was %s and is now %s",
                            format_address(self.address), self.name, hello.node)
            self.name = hello.node
            transport.named(self)
            self._last_failure = None
            self.expected_down = False
            self._failures = 0
            self._dropped = 0
            self.queue = asyncio.Queue(transport.send_queue_frames)
            log.info("connected to peer %s at %s", hello.node, format_address(self.address))
            await _first_done(self._write_loop(writer, self.queue), _await_eof(reader))
            raise ConnectionResetError("connection closed")
        finally:
            self.queue = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _write_loop(self, writer: asyncio.StreamWriter, queue: asyncio.Queue[bytes]) -> None:
        while True:
            data = await queue.get()
            try:
                writer.write(frame_bytes(data))
                await writer.drain()
            finally:
                queue.task_done()

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            await cancel_and_wait(self.task)


async def _await_eof(reader: asyncio.StreamReader) -> None:
    # The acceptor never writes after its hello; anything it does send is discarded.
    while await reader.read(4096):
        pass


async def _first_done(*coroutines: Coroutine[Any, Any, None]) -> None:
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # re-raise its error, if any
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed during handshake"
    if isinstance(exc, OSError):
        return os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return str(exc) or type(exc).__name__


class Transport:
    """The TCP mesh of one node. ``on_message(peer_name, frame)`` receives every core frame.

    ``peer_names`` optionally gives the node name expected at a peer address; a peer answering
    with another name is refused. Without it, names are learnt from the peers' hellos.
    """

    def __init__(
        self,
        *,
        node: str,
        cluster: str,
        pool_size: int,
        listen: Address,
        peers: Sequence[Address],
        on_message: MessageHandler,
        peer_names: Mapping[Address, str] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        handshake_timeout: float = 5.0,
        send_queue_frames: int = 4096,
        max_inbound: int = 256,
        idle_timeout: float | None = 300.0,
    ) -> None:
        """``max_inbound`` caps the accepted connections (handshaken or not); a full mesh needs
        one per peer. ``idle_timeout`` (None: never) drops an accepted connection that carries no
        frame for that many seconds after its handshake."""
        self.hello = Hello(node=node, cluster=cluster, pool_size=pool_size,
                           protocol=PROTOCOL_VERSION)
        self.hello_bytes = encode(self.hello, limits)
        self.listen = listen
        self.on_message = on_message
        self.limits = limits
        self.backoff = backoff or Backoff()
        self.rng = rng or random.Random()
        self.handshake_timeout = handshake_timeout
        self.send_queue_frames = send_queue_frames
        self.max_inbound = max_inbound
        self.idle_timeout = idle_timeout
        self.refused_connections = 0
        """Connections closed at once because ``max_inbound`` were open."""
        self.bad_frames = 0
        """Frames dropped because they failed to decode or broke the frame size limit."""
        self.cut_frames = 0
        """Frames dropped because their link is cut, in either direction."""
        names = peer_names or {}
        self._outbound = [
            _Outbound(self, address, names.get(address)) for address in dict.fromkeys(peers)
        ]
        self._inbound: dict[asyncio.StreamWriter, str | None] = {}
        self._cut: set[str] = set()
        self._server: asyncio.Server | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._retired: set[asyncio.Task[None]] = set()
        """Dialers stopped because another one reaches the same peer; awaited on close."""

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, then dial every peer. Raises ``OSError`` if the address cannot be bound."""
        self._server = await asyncio.start_server(self._accept, *self.listen)
        # Only now is the port known (0 asks for any), so only now can the hello advertise it.
        self.hello = replace(self.hello, listen=self.address)
        self.hello_bytes = encode(self.hello, self.limits)
        for outbound in self._outbound:
            outbound.start()
        log.info("%s listening on %s", self.hello.node, format_address(self.address))

    def add_peer(self, address: Address, name: str | None = None) -> None:
        """Dial one more peer (a no-op for an address already dialed)."""
        for outbound in self._outbound:
            if outbound.address == address:
                outbound.learnt = False  # configured now: never replaced by a dial-back
                return
        outbound = _Outbound(self, address, name)
        self._outbound.append(outbound)
        if self._server is not None:
            outbound.start()

    @property
    def address(self) -> Address:
        """The bound listen address (its port is the real one when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            return self.listen
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def flush(self, timeout: float) -> None:
        """Wait until every queued frame is written, for at most ``timeout`` seconds."""
        queues = [o.queue for o in self._outbound if o.queue is not None]
        if queues:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(q.join() for q in queues)), timeout)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(o.stop() for o in self._outbound), *self._retired,
                             return_exceptions=True)
        # Closing the sockets ends the readers; cancelling is only the fallback.
        for writer in list(self._inbound):
            writer.close()
        if self._readers:
            _, pending = await asyncio.wait(list(self._readers), timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # --- sending and partitions -----------------------------------------------------------------

    def send(self, data: bytes, to: str | None = None) -> None:
        """Queue an encoded frame for peer ``to``, or for every connected peer when None.

        Dropped silently for a peer that is not connected or is cut. A peer reached by two
        dialers (configured under two addresses) gets the frame once.
        """
        sent: set[str] = set()
        for outbound in self._outbound:
            name = outbound.name
            if name is None or outbound.queue is None or name in sent:
                continue
            if to is not None and name != to:
                continue
            sent.add(name)
            if name in self._cut:
                self.cut_frames += 1
                continue
            outbound.offer(data)

    def departed(self, name: str) -> None:
        """The peer ``name`` left on purpose: failures to reach it are no longer warnings."""
        for outbound in self._outbound:
            if outbound.name == name:
                outbound.expected_down = True

    def can_send(self, name: str) -> bool:
        """Whether a frame for peer ``name`` would be queued now (connected and not cut)."""
        return name not in self._cut and any(
            o.name == name and o.queue is not None for o in self._outbound
        )

    def cut(self, names: Iterable[str]) -> None:
        self._cut.update(names)
        log.warning("link cut to %s", ", ".join(sorted(self._cut)) or "nobody")

    def heal(self, names: Iterable[str]) -> None:
        self._cut.difference_update(names)
        log.warning("links healed; still cut: %s", ", ".join(sorted(self._cut)) or "none")

    @property
    def cut_peers(self) -> frozenset[str]:
        return frozenset(self._cut)

    def connected(self) -> list[str]:
        """Names of the peers this node can currently send to."""
        return sorted({o.name for o in self._outbound if o.queue is not None and o.name})

    def inbound(self) -> list[str]:
        """Names of the peers currently connected to this node."""
        return sorted(name for name in self._inbound.values() if name)

    # --- receiving ------------------------------------------------------------------------------

    def check_hello(self, hello: Hello) -> None:
        """Raise ``HandshakeError`` if the peer that sent ``hello`` may not join this mesh."""
        own = self.hello
        if hello.protocol != own.protocol:
            raise HandshakeError(
                f"{hello.node} speaks protocol {hello.protocol}, not {own.protocol}"
            )
        if hello.cluster != own.cluster:
            raise HandshakeError(
                f"{hello.node} is in cluster {hello.cluster!r}, not {own.cluster!r}"
            )
        if hello.pool_size != own.pool_size:
            raise HandshakeError(
                f"{hello.node} has pool_size {hello.pool_size}, this node {own.pool_size}; "
                "every node of a cluster must use the same pool size"
            )
        if hello.node == own.node:
            raise HandshakeError(f"the peer calls itself {hello.node!r}, as this node does")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = _remote(writer)
        if len(self._inbound) >= self.max_inbound:
            self.refused_connections += 1
            if self.refused_connections == 1 or self.refused_connections % 1000 == 0:
                log.warning("refusing connection from %s: %d connections are open already "
                            "(%d refused so far)", remote, self.max_inbound,
                            self.refused_connections)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._readers.add(task)
        self._inbound[writer] = None
        try:
            name = await self._handshake_inbound(reader, writer, remote)
            if name is not None:
                self._inbound[writer] = name
                await self._read_loop(reader, name)
        except asyncio.IncompleteReadError:
            log.debug("inbound connection from %s closed", remote)
        except IdleConnection as exc:
            log.info("dropping the connection from %s: %s", self._inbound[writer] or remote, exc)
        except FrameTooLarge as exc:
            self.bad_frames += 1
            log.warning("dropping connection from %s: %s", self._inbound[writer] or remote, exc)
        except (OSError, TimeoutError) as exc:
            log.debug("inbound connection from %s: %s", remote, _describe_error(exc))
        except asyncio.CancelledError:
            # Ends the handler quietly: asyncio 3.11 logs an error for a cancelled handler task.
            pass
        except Exception:
            log.exception("inbound connection from %s failed", remote)
        finally:
            self._inbound.pop(writer, None)
            self._readers.discard(task)
            writer.close()

    async def _handshake_inbound(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remote: str
    ) -> str | None:
        async with asyncio.timeout(self.handshake_timeout):
            data = await read_frame(reader, MAX_HELLO_BYTES)
        try:
            hello = decode(data, self.limits)
        except CodecError as exc:
            self.bad_frames += 1
            log.warning("refusing connection from %s: bad first frame: %s", remote, exc)
            return None
        if not isinstance(hello, Hello):
            self.bad_frames += 1
            log.warning("refusing connection from %s: first frame is not a hello", remote)
            return None
        # Reply even to a refused peer, so that it can log why it was refused.
        writer.write(frame_bytes(self.hello_bytes))
        await writer.drain()
        try:
            self.check_hello(hello)
        except HandshakeError as exc:
            log.warning("refusing connection from %s: %s", remote, exc)
            return None
        log.info("peer %s connected from %s", hello.node, remote)
        for outbound in self._outbound:
            if outbound.queue is None and outbound.name in (None, hello.node):
                outbound.wake.set()
        self._dial_back(hello, writer)
        return hello.node

    def _dial_back(self, hello: Hello, writer: asyncio.StreamWriter) -> None:
        """Dial a peer that dialed this node but that this node does not dial (configured in one
        direction only): else frames would only flow one way, and the peer would see this node
        up while nothing of its own ever arrived here."""
        if hello.listen is None:
            return
        address = _reachable(hello.listen, writer)
        name = hello.node
        for outbound in list(self._outbound):
            if outbound.address == address:
                if not outbound.learnt or outbound.expected == name:
                    return
                self._retire(outbound)  # another node listens there now
            elif outbound.name == name or outbound.expected == name:
                if not outbound.learnt:
                    return  # configured: the wake-up above redials it
                # A dial-back to an address the peer no longer listens on (it restarted).
                self._retire(outbound)
        if sum(o.learnt for o in self._outbound) >= self.max_inbound:
            log.warning("not dialing back %s at %s: %d peers are dialed back already",
                        name, format_address(address), self.max_inbound)
            return
        log.info("peer %s is not in this node's peer list; dialing it back at %s",
                 name, format_address(address))
        outbound = _Outbound(self, address, name, learnt=True)
        self._outbound.append(outbound)
        if self._server is not None:
            outbound.start()

    def named(self, outbound: _Outbound) -> None:
        """``outbound`` has just learnt its peer's name: a dial-back to the same peer is
        redundant beside a configured dialer."""
        if outbound.learnt:
            return
        for other in list(self._outbound):
            if other is not outbound and other.learnt and other.name == outbound.name:
                self._retire(other)

    def _retire(self, outbound: _Outbound) -> None:
        self._outbound.remove(outbound)
        outbound.stopping = True
        if outbound.task is not None:
            outbound.task.cancel()
            self._retired.add(outbound.task)
            outbound.task.add_done_callback(self._retired.discard)

    async def _read_loop(self, reader: asyncio.StreamReader, name: str) -> None:
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    data = await read_frame(reader, self.limits.max_frame_bytes)
            except TimeoutError:
                raise IdleConnection(f"no frame for {self.idle_timeout:g} s") from None
            try:
                frame = decode(data, self.limits)
            except CodecError as exc:
                self.bad_frames += 1
                log.warning("dropping a bad frame from %s: %s", name, exc)
                continue
            except Exception:  # a validator bug must not cost the connection
                self.bad_frames += 1
                log.exception("dropping a frame from %s that failed to decode", name)
                continue
            if not isinstance(frame, ShardMessage):
                log.warning("dropping an unexpected hello from %s", name)
                continue
            if name in self._cut:
                self.cut_frames += 1
                continue
            try:
                self.on_message(name, frame)
            except Exception:
                log.exception("error handling a frame from %s", name)


class IdleConnection(Exception):
    """An accepted connection that stayed silent for longer than the idle timeout."""


def _reachable(listen: Address, writer: asyncio.StreamWriter) -> Address:
    """Where to dial a peer that listens on ``listen``: its own word, except for a host that
    names no machine from here (unspecified, or loopback while it connects from elsewhere), which
    is replaced by the address the connection comes from."""
    host, port = listen
    peer = writer.get_extra_info("peername")
    remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
    if remote is None:
        return listen
    try:
        advertised = ipaddress.ip_address(host)
    except ValueError:
        return listen  # a host name: trust it
    try:
        remote_is_loopback = ipaddress.ip_address(remote).is_loopback
    except ValueError:
        remote_is_loopback = False
    if advertised.is_unspecified or (advertised.is_loopback and not remote_is_loopback):
        return remote, port
    return listen


def _remote(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_address((str(peer[0]), int(peer[1])))
    return "unknown"
