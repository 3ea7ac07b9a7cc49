"""Helpers for the asyncio runtime tests: fast periods, in-process meshes, polling, raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from presence.core.config import Config
from presence.runtime.codec import Hello, encode
from presence.runtime.node import Node
from presence.runtime.transport import Address, Backoff, frame_bytes

T = TypeVar("T")

FAST = Config(broadcast_period_ms=20, max_silent_periods=5, down_period_ms=400,
              permdown_period_ms=5000)
"""Ticks every 20 ms; a silent peer is down after 0.4 s."""

QUICK_BACKOFF = Backoff(initial=0.02, maximum=0.2)

View = set[tuple[str, str, str, str]]


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run an async test body, with a hard timeout so a hang fails instead of blocking."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], what: str,
                     timeout: float = 5.0) -> None:
    """Poll until ``predicate`` holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def view(node: Node) -> View:
    """What a node lists: ``(topic, key, owner, ref)`` per presence."""
    return {(p.topic, p.key, p.owner, str(p.meta["phx_ref"])) for p in node.observe()}


def all_see(nodes: Iterable[Node], expected: View) -> Callable[[], bool]:
    nodes = list(nodes)
    return lambda: all(view(node) == expected for node in nodes)


async def connect_mesh(nodes: Iterable[Node]) -> None:
    """Have every node dial every other one, and wait until all links are up."""
    nodes = list(nodes)
    for node in nodes:
        for peer in nodes:
            if peer is not node:
                node.add_peer(peer.address, peer.name)
    await eventually(
        lambda: all(len(node.transport.connected()) == len(nodes) - 1 for node in nodes),
        "the mesh to connect",
    )


@contextlib.asynccontextmanager
async def mesh(names: Iterable[str], config: Config = FAST,
               **options: Any) -> AsyncIterator[dict[str, Node]]:
    """Started nodes on loopback, fully connected; stopped (not gracefully) on exit."""
    nodes = {name: Node(name, config=config, backoff=QUICK_BACKOFF, **options)
             for name in names}
    try:
        for node in nodes.values():
            await node.start()
        await connect_mesh(nodes.values())
        yield nodes
    finally:
        for node in nodes.values():
            await node.stop(graceful=False)


async def raw_connection(address: Address, hello: Hello | None
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-driven socket to a node, optionally past the handshake (its reply is read)."""
    reader, writer = await asyncio.open_connection(*address)
    if hello is not None:
        writer.write(frame_bytes(encode(hello)))
        await writer.drain()
        length = int.from_bytes(await reader.readexactly(4), "big")
        await reader.readexactly(length)
    return reader, writer


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """Whether the other end closes the connection within ``timeout``."""
    try:
        while await asyncio.wait_for(reader.read(4096), timeout):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True
