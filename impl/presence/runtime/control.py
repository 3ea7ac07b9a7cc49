"""A local control endpoint: JSON lines over TCP on loopback, for the demo, tests and operators.

Each request is one line holding a JSON object with an ``op`` and its arguments; each reply is
one line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "kind": "..."}``.
Requests on one connection are answered in order.

=================  ==============================  ============================================
op                 arguments                       result
=================  ==============================  ============================================
``track``          owner, topic, key, meta         ``{"ref": ...}``
``update``         owner, topic, key, meta         ``{"ref": ...}``
``untrack``        owner, topic, key               ``{"removed": bool}``
``untrack_owner``  owner                           ``{"removed": count}``
``list``           topic (optional)                ``{"presences": [{topic, key, owner, meta}]}``
``peers``                                          ``{"peers": [{name, vsn, status}], ...}``
``cut``, ``heal``  peers (list of node names)      ``{"cut": [names still cut]}``
``info``                                           name, vsn, cluster, sizes, address, periods
``shutdown``       graceful (optional, true)       ``{}``, then the node stops
=================  ==============================  ============================================

The endpoint has no authentication: it only listens on loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from presence.core.types import PresenceError
from presence.runtime.node import Node
from presence.runtime.transport import Address, format_address

log = logging.getLogger("presence.control")

MAX_LINE_BYTES = 1024 * 1024
OPS = ("track", "update", "untrack", "untrack_owner", "list", "peers", "cut", "heal", "info",
       "shutdown")


class ControlError(Exception):
    """A request the node refused; ``kind`` names the error class on the node's side."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _field(request: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    value = request.get(name, default)
    if value is ...:
        raise ControlError(f"missing field {name!r}", "bad_request")
    # bool is an int in Python, never in a request.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ControlError(f"field {name!r} must be of type {kind.__name__}", "bad_request")
    return value


def _presence_json(presence: Any) -> dict[str, Any]:
    return {"topic": presence.topic, "key": presence.key, "owner": presence.owner,
            "meta": dict(presence.meta)}


class ControlServer:
    """Serves the control ops of one node. ``on_shutdown(graceful)`` is called by ``shutdown``."""

    def __init__(
        self,
        node: Node,
        address: Address,
        on_shutdown: Callable[[bool], None] | None = None,
    ) -> None:
        if not is_loopback(address[0]):
            raise ValueError(f"the control endpoint must listen on loopback, not {address[0]!r}")
        self.node = node
        self.listen = address
        self.on_shutdown = on_shutdown
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, *self.listen, limit=MAX_LINE_BYTES)
        log.info("control endpoint on %s", format_address(self.address))

    @property
    def address(self) -> Address:
        if self._server is None or not self._server.sockets:
            return self.listen
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while line := await reader.readline():
                reply, after = self._handle_line(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
                if after is not None:
                    after()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError) as exc:
            # ValueError: StreamReader's report of a line over the limit.
            log.debug("control connection closed: %s", exc)
        except asyncio.CancelledError:
            pass  # asyncio 3.11 logs an error for a cancelled handler task
        finally:
            self._connections.discard(task)
            writer.close()

    def _handle_line(self, line: bytes) -> tuple[dict[str, Any], Callable[[], None] | None]:
        try:
            request = json.loads(line.decode("utf-8"))
            if not isinstance(request, dict):
                raise ControlError("a request must be a JSON object", "bad_request")
            result, after = self._dispatch(request)
        except UnicodeDecodeError:
            return {"ok": False, "error": "a request must be UTF-8 text",
                    "kind": "bad_request"}, None
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"invalid JSON: {exc}", "kind": "bad_request"}, None
        except RecursionError:  # json.loads of a line of ten thousand "["
            return {"ok": False, "error": "request nested too deeply",
                    "kind": "bad_request"}, None
        except ControlError as exc:
            return {"ok": False, "error": str(exc), "kind": exc.kind}, None
        except PresenceError as exc:
            return {"ok": False, "error": str(exc), "kind": type(exc).__name__}, None
        except Exception as exc:
            log.exception("control request failed")
            return {"ok": False, "error": str(exc), "kind": type(exc).__name__}, None
        return {"ok": True, "result": result}, after

    def _dispatch(
        self, request: dict[str, Any]
    ) -> tuple[dict[str, Any], Callable[[], None] | None]:
        node = self.node
        op = _field(request, "op", str)
        if op in ("track", "update", "untrack"):
            owner = _field(request, "owner", str)
            topic = _field(request, "topic", str)
            key = _field(request, "key", str)
            if op == "untrack":
                return {"removed": node.untrack(owner, topic, key)}, None
            meta = _field(request, "meta", dict, {})
            operation = node.track if op == "track" else node.update
            return {"ref": operation(owner, topic, key, meta)}, None
        if op == "untrack_owner":
            return {"removed": node.untrack_owner(_field(request, "owner", str))}, None
        if op == "list":
            topic = request.get("topic")
            if topic is not None and not isinstance(topic, str):
                raise ControlError("field 'topic' must be a string", "bad_request")
            presences = node.observe() if topic is None else node.list(topic)
            return {"presences": [_presence_json(p) for p in presences]}, None
        if op == "peers":
            return {
                "peers": [{"name": r.name, "vsn": r.vsn, "status": s.value}
                          for r, s in node.peers().items()],
                "connected": node.transport.connected(),
                "inbound": node.transport.inbound(),
                "cut": sorted(node.transport.cut_peers),
            }, None
        if op in ("cut", "heal"):
            names = _field(request, "peers", list)
            if not all(isinstance(name, str) for name in names):
                raise ControlError("peers must be a list of node names", "bad_request")
            (node.cut if op == "cut" else node.heal)(names)
            return {"cut": sorted(node.transport.cut_peers)}, None
        if op == "info":
            return self._info(), None
        if op == "shutdown":
            graceful = _field(request, "graceful", bool, True)
            return {}, lambda: self._shutdown(graceful)
        raise ControlError(f"unknown op {op!r}; ops: {', '.join(OPS)}", "bad_request")

    def _info(self) -> dict[str, Any]:
        node = self.node
        sizes = {topic: len(node.list(topic)) for topic in node.topics()}
        config = node.config
        return {
            "name": node.name,
            "vsn": node.vsn,
            "cluster": node.cluster,
            "pool_size": node.pool_size,
            "address": format_address(node.address),
            "topics": sizes,
            "total": sum(sizes.values()),
            "bad_frames": node.transport.bad_frames,
            "cut_frames": node.transport.cut_frames,
            "refused_connections": node.transport.refused_connections,
            "rejected_messages": node.rejected_messages,
            "config": {
                "broadcast_period_ms": config.broadcast_period_ms,
                "max_silent_periods": config.max_silent_periods,
                "down_period_ms": config.down_ms,
                "permdown_period_ms": config.permdown_period_ms,
                "clock_sample_periods": config.clock_sample_periods,
            },
        }

    def _shutdown(self, graceful: bool) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown(graceful)
        else:
            task = asyncio.create_task(self.node.stop(graceful))
            self._connections.add(task)  # keep a reference until it is done
            task.add_done_callback(self._connections.discard)


class ControlClient:
    """One connection to a node's control endpoint; requests are sent one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, address: Address, timeout: float = 5.0) -> ControlClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(*address, limit=64 * MAX_LINE_BYTES), timeout
        )
        return cls(reader, writer)

    async def call(self, op: str, **arguments: Any) -> Any:
        """Send one request; returns its result or raises ``ControlError``.

        Raises ``ConnectionError`` if the node closed the connection.
        """
        async with self._lock:
            self._writer.write(json.dumps({"op": op, **arguments}).encode() + b"\n")
            await self._writer.drain()
            line = await self._reader.readline()
        if not line:
            raise ConnectionResetError("the node closed the control connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")), str(reply.get("kind", "error")))
        return reply.get("result")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
