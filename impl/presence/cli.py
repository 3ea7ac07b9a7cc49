"""The ``presence`` command: run one node, or the three-node demo.

Every error a user can cause (a bad flag, a bad address, a port in use) ends the command with one
line on stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from presence.core.config import Config
from presence.core.types import ConfigError
from presence.runtime.control import ControlServer, is_loopback
from presence.runtime.transport import Address, Backoff, format_address

PROG = "presence"
EXIT_USAGE = 2


class UsageError(Exception):
    """An error in what the user asked for; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parse_address(text: str) -> Address:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}, expected HOST:PORT")
    return host, int(port_text)


def parse_peer(text: str) -> tuple[str | None, Address]:
    """``HOST:PORT`` (the name is learnt from the peer) or ``NAME=HOST:PORT`` (checked)."""
    name, sep, address = text.rpartition("=")
    if sep and not name:
        raise argparse.ArgumentTypeError(f"invalid peer {text!r}, expected [NAME=]HOST:PORT")
    return (name or None), parse_address(address)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def add_period_flags(parser: argparse.ArgumentParser, defaults: Config,
                     down_default: int | None = None) -> None:
    """The period flags, defaulting to ``defaults``; ``--down-ms`` defaults to ``down_default``
    (None: derived from the other periods, as the core's config does)."""
    group = parser.add_argument_group("periods (milliseconds)")
    group.add_argument("--broadcast-ms", type=positive_int, default=defaults.broadcast_period_ms,
                       help="tick and heartbeat period (default: %(default)s)")
    group.add_argument("--max-silent", type=positive_int, default=defaults.max_silent_periods,
                       help="ticks without news before an idle heartbeat (default: %(default)s)")
    group.add_argument("--down-ms", type=positive_int, default=down_default,
                       help="silence before a peer is down (default: "
                            + ("2 x max-silent x broadcast-ms" if down_default is None
                               else "%(default)s") + ")")
    group.add_argument("--permdown-ms", type=positive_int, default=defaults.permdown_period_ms,
                       help="silence before a peer is forgotten (default: %(default)s)")
    group.add_argument("--clock-sample-periods", type=positive_int,
                       default=defaults.clock_sample_periods,
                       help="ticks between clock comparisons (default: %(default)s)")
    group.add_argument("--reconnect-max-ms", type=positive_int, default=5000,
                       help="cap of the reconnect backoff (default: %(default)s)")


def backoff_from(args: argparse.Namespace) -> Backoff:
    """The reconnect backoff for ``--reconnect-max-ms``: a cap below the usual first delay
    (100 ms) lowers the first delay too."""
    maximum = args.reconnect_max_ms / 1000
    return Backoff(initial=min(Backoff().initial, maximum), maximum=maximum)


def config_from(args: argparse.Namespace) -> Config:
    try:
        return Config(
            broadcast_period_ms=args.broadcast_ms,
            max_silent_periods=args.max_silent,
            down_period_ms=args.down_ms,
            permdown_period_ms=args.permdown_ms,
            clock_sample_periods=args.clock_sample_periods,
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Distributed presence tracking.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    node = commands.add_parser(
        "node", help="run one node until SIGTERM or Ctrl-C",
        description="Run one node. SIGTERM or Ctrl-C stops it gracefully: peers drop its "
                    "presences at once.")
    node.add_argument("--name", required=True, help="node name, unique in the cluster")
    node.add_argument("--listen", type=parse_address, required=True, metavar="HOST:PORT",
                      help="address peers connect to")
    node.add_argument("--peer", type=parse_peer, action="append", default=[],
                      metavar="[NAME=]HOST:PORT",
                      help="a peer to connect to (repeat for each); NAME, if given, is checked")
    node.add_argument("--control", type=parse_address, metavar="HOST:PORT",
                      help="loopback address of the JSON-lines control endpoint")
    node.add_argument("--cluster", default="presence", help="cluster name (default: presence)")
    node.add_argument("--pool-size", type=positive_int, default=1,
                      help="shards per node, the same on every node (default: 1)")
    node.add_argument("--vsn", type=non_negative_int,
                      help="incarnation number, larger than any earlier one of this name "
                           "(default: the time in nanoseconds)")
    node.add_argument("--log-level", default="INFO",
                      choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_period_flags(node, Config())

    from presence import demo

    demo.add_arguments(commands.add_parser(
        "demo", help="run the three-node demo on loopback",
        description="Start three node processes on loopback and check that they converge "
                    "through churn, a killed node, its restart and a netsplit."))
    return parser


def _resolve(host: str, port: int) -> None:
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc.strerror or exc}") from None


async def run_node(args: argparse.Namespace) -> int:
    from presence.runtime.node import Node

    config = config_from(args)
    peers: list[Address] = []
    peer_names: dict[Address, str] = {}
    for name, address in args.peer:
        _resolve(*address)
        peers.append(address)
        if name is not None:
            peer_names[address] = name
    if args.control is not None and not is_loopback(args.control[0]):
        raise UsageError(f"--control must be a loopback address, not {args.control[0]!r}")
    try:
        node = Node(args.name, listen=args.listen, peers=peers, peer_names=peer_names,
                    config=config, pool_size=args.pool_size, cluster=args.cluster, vsn=args.vsn,
                    backoff=backoff_from(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    graceful = True

    def shut_down(graceful_stop: bool = True) -> None:
        nonlocal graceful
        graceful = graceful_stop
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shut_down)
    try:
        await node.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on {format_address(args.listen)}: "
                         f"{exc.strerror or exc}") from None
    control = None
    try:
        if args.control is not None:
            control = ControlServer(node, args.control, on_shutdown=shut_down)
            try:
                await control.start()
            except OSError as exc:
                raise UsageError(f"cannot listen on {format_address(args.control)}: "
                                 f"{exc.strerror or exc}") from None
        logging.getLogger("presence").info(
            "node %s (vsn %d) up on %s", node.name, node.vsn, format_address(node.address))
        await stopping.wait()
    finally:
        if control is not None:
            await control.close()
        await node.stop(graceful=graceful)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "node":
            return asyncio.run(run_node(args))
        from presence import demo

        return demo.main(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
