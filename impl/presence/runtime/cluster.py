"""Run a cluster of node processes on loopback: the demo's and the end-to-end tests' harness.

Each node is ``python -m presence node`` with a control endpoint; this module starts them on free
ports, talks to them through :class:`ControlClient`, kills, restarts and partitions them, and polls
until every live node lists exactly an expected set of presences. Child processes never outlive
the :class:`Cluster` context, however it is left; on Linux they do not outlive the process that
started them either, even when it is killed with SIGKILL (they get SIGTERM, a graceful stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import presence
from presence.core.config import Config
from presence.runtime.control import ControlClient, ControlError
from presence.runtime.transport import Address, format_address

HOST = "127.0.0.1"

PresenceKey = tuple[str, str, str, str]
"""``(topic, key, owner, ref)``: a presence, identified down to its incarnation (ID4, ID5)."""


class ClusterError(Exception):
    """A node process that could not be started or reached."""


def free_ports(count: int, host: str = HOST) -> list[int]:
    """Ports free right now (held open together, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass(frozen=True, slots=True)
class Timing:
    """The periods every node of the cluster runs with, in milliseconds."""

    broadcast_ms: int = 100
    max_silent: int = 5
    down_ms: int = 1000
    permdown_ms: int = 10_000
    clock_sample_periods: int = 2
    reconnect_max_ms: int = 500

    def config(self) -> Config:
        """The core's config for these periods; raises ``ConfigError`` if they are invalid."""
        return Config(broadcast_period_ms=self.broadcast_ms, max_silent_periods=self.max_silent,
                      down_period_ms=self.down_ms, permdown_period_ms=self.permdown_ms,
                      clock_sample_periods=self.clock_sample_periods)

    def flags(self) -> list[str]:
        return ["--broadcast-ms", str(self.broadcast_ms), "--max-silent", str(self.max_silent),
                "--down-ms", str(self.down_ms), "--permdown-ms", str(self.permdown_ms),
                "--clock-sample-periods", str(self.clock_sample_periods),
                "--reconnect-max-ms", str(self.reconnect_max_ms)]


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so that a SIGKILLed demo or test leaves no node running.
    None where that is not available: best effort."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not after
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: no signal will come
            os._exit(1)

    return preexec


def _child_env() -> dict[str, str]:
    # Children import this very package, installed or not.
    source_root = str(Path(presence.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    return env


class NodeProcess:
    """One ``presence node`` child process and a control connection to it."""

    def __init__(self, name: str, listen: Address, control: Address, peers: Mapping[str, Address],
                 timing: Timing, log_dir: Path, log_level: str = "INFO") -> None:
        self.name = name
        self.listen = listen
        self.control = control
        self.peers = dict(peers)
        self.timing = timing
        self.log_dir = log_dir
        self.log_level = log_level
        self.vsn = 0
        self.process: asyncio.subprocess.Process | None = None
        self.client: ControlClient | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    async def start(self, timeout: float = 20.0) -> None:
        """Spawn a new incarnation (vsn strictly larger than the last) and wait for its control
        endpoint. Raises ``ClusterError`` if it exits or does not answer in time."""
        self.vsn = max(time.time_ns(), self.vsn + 1)
        command = [
            sys.executable, "-m", "presence", "node", "--name", self.name,
            "--listen", format_address(self.listen), "--control", format_address(self.control),
            "--vsn", str(self.vsn), "--log-level", self.log_level, *self.timing.flags(),
        ]
        for peer, address in sorted(self.peers.items()):
            command += ["--peer", f"{peer}={format_address(address)}"]
        with self.log_path.open("ab") as log:
            log.write(f"--- incarnation {self.vsn}\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                env=_child_env(), preexec_fn=_die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.returncode is not None:
                raise ClusterError(f"node {self.name} exited with status "
                                   f"{self.process.returncode}: {self.last_log_line()}")
            try:
                self.client = await ControlClient.connect(self.control, timeout=1.0)
                return
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    where = format_address(self.control)
                    raise ClusterError(f"node {self.name} did not open its control endpoint "
                                       f"{where} in {timeout:.0f} s") from None
                await asyncio.sleep(0.05)

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    async def call(self, op: str, **arguments: Any) -> Any:
        if self.client is None:
            raise ClusterError(f"node {self.name} is not running")
        return await self.client.call(op, **arguments)

    async def _close_client(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()

    async def kill(self) -> None:
        """SIGKILL: the node gets no chance to tell its peers."""
        await self._close_client()
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL if it has not ended within ``timeout``."""
        await self._close_client()
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass(slots=True)
class Convergence:
    """The outcome of waiting for the live nodes to list an expected set of presences."""

    converged: bool
    seconds: float
    totals: dict[str, int] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    ghosts: dict[str, int] = field(default_factory=dict)


class Cluster:
    """Node processes named ``names`` in a full mesh on loopback; an async context manager."""

    def __init__(self, names: Iterable[str], timing: Timing, log_dir: Path,
                 log_level: str = "INFO", history: TextIO | None = None) -> None:
        """``history``, if given, receives one JSON line per control call, lifecycle event and
        convergence check, with ``t`` in seconds since the cluster was created."""
        names = list(names)
        self.history = history
        self._created = time.monotonic()
        ports = free_ports(2 * len(names))
        listen = {name: (HOST, ports[2 * i]) for i, name in enumerate(names)}
        self.timing = timing
        self.log_dir = log_dir
        self.nodes = {
            name: NodeProcess(
                name, listen[name], (HOST, ports[2 * i + 1]),
                {peer: address for peer, address in listen.items() if peer != name},
                timing, log_dir, log_level,
            )
            for i, name in enumerate(names)
        }

    @property
    def live(self) -> list[str]:
        return [name for name, node in self.nodes.items() if node.alive]

    async def start(self) -> None:
        await asyncio.gather(*(node.start() for node in self.nodes.values()))
        for name, node in self.nodes.items():
            self.record("start", node=name, vsn=node.vsn)

    async def close(self) -> None:
        """Stop every node; kill any that does not stop. Safe to call more than once."""
        await asyncio.gather(*(node.stop() for node in self.nodes.values()),
                             return_exceptions=True)

    async def __aenter__(self) -> Cluster:
        try:
            await self.start()
        except BaseException:
            await asyncio.shield(self.close())
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Shielded: on Ctrl-C the cancelled demo must still reap its children.
        await asyncio.shield(self.close())

    def record(self, kind: str, **fields: Any) -> None:
        if self.history is not None:
            line = {"t": round(time.monotonic() - self._created, 4), "kind": kind, **fields}
            self.history.write(json.dumps(line, sort_keys=True) + "\n")

    async def call(self, name: str, op: str, **arguments: Any) -> Any:
        try:
            result = await self.nodes[name].call(op, **arguments)
        except ControlError as exc:
            if op not in ("list", "info", "peers"):
                self.record("op", node=name, op=op, args=arguments, error=str(exc))
            raise
        if op not in ("list", "info", "peers"):  # queries would drown the history
            self.record("op", node=name, op=op, args=arguments, result=result)
        return result

    async def kill(self, name: str) -> None:
        await self.nodes[name].kill()
        self.record("kill", node=name)

    async def restart(self, name: str) -> None:
        await self.nodes[name].start()
        self.record("start", node=name, vsn=self.nodes[name].vsn)

    async def split(self, side: Iterable[str]) -> None:
        """Cut every link between ``side`` and the other nodes, at both ends."""
        inside = set(side)
        outside = [name for name in self.nodes if name not in inside]
        for name in self.live:
            others = outside if name in inside else sorted(inside)
            await self.call(name, "cut", peers=others)
        self.record("split", side=sorted(inside), other_side=outside)

    async def heal(self) -> None:
        for name in self.live:
            await self.call(name, "heal", peers=list(self.nodes))
        self.record("heal")

    async def observe(self, name: str) -> set[PresenceKey]:
        result = await self.call(name, "list")
        return {(p["topic"], p["key"], p["owner"], p["meta"]["phx_ref"])
                for p in result["presences"]}

    async def wait_for(self, expected: Mapping[str, Set[PresenceKey]], timeout: float,
                       started: float | None = None, poll: float = 0.05) -> Convergence:
        """Poll until each node in ``expected`` lists exactly its expected set, or time out.

        ``started`` (a ``time.monotonic`` value) is when the change being waited for began.
        """
        start = time.monotonic() if started is None else started
        deadline = time.monotonic() + timeout
        while True:
            views = {name: await self.observe(name) for name in expected}
            converged = all(views[name] == expected[name] for name in expected)
            if converged or time.monotonic() > deadline:
                outcome = Convergence(
                    converged, time.monotonic() - start,
                    {name: len(view) for name, view in views.items()},
                    missing={name: len(expected[name] - views[name]) for name in expected},
                    ghosts={name: len(views[name] - expected[name]) for name in expected},
                )
                self.record("check", converged=converged, seconds=round(outcome.seconds, 4),
                            totals=outcome.totals, missing=outcome.missing,
                            ghosts=outcome.ghosts,
                            expected={n: sorted(map(list, expected[n])) for n in expected})
                return outcome
            await asyncio.sleep(poll)
