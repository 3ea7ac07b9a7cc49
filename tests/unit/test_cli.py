"""The command line: every user error is one line on stderr and a non-zero status."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from presence.cli import backoff_from, build_parser, main, parse_address, parse_peer
from presence.runtime.transport import Backoff


@pytest.mark.parametrize("argv, message", [
    (["node", "--name", "a", "--listen", "nonsense"], "invalid address 'nonsense'"),
    (["node", "--name", "a", "--listen", "127.0.0.1:99999"], "invalid address"),
    (["node", "--listen", "127.0.0.1:0"], "the following arguments are required: --name"),
    (["node", "--name", "a", "--listen", "127.0.0.1:0", "--peer", "=127.0.0.1:1"],
     "invalid peer"),
    (["node", "--name", "a", "--listen", "127.0.0.1:0", "--broadcast-ms", "0"],
     "expected a positive integer"),
    (["node", "--name", "a", "--listen", "127.0.0.1:0", "--broadcast-ms", "100",
      "--max-silent", "5", "--down-ms", "400"], "must exceed the idle heartbeat interval"),
    (["node", "--name", "a", "--listen", "127.0.0.1:0", "--control", "192.0.2.1:7000"],
     "--control must be a loopback address"),
    (["node", "--name", "", "--listen", "127.0.0.1:0"], "node name must be"),
    (["demo", "--users", "0"], "expected a positive integer"),
    (["demo", "--down-ms", "1000", "--permdown-ms", "900"], "permdown_period_ms"),
    (["demo", "--timeout", "0"], "--timeout must be positive"),
    (["demo", "--timeout", "nan"], "--timeout must be positive and finite"),
    (["demo", "--timeout", "inf"], "--timeout must be positive and finite"),
    (["node", "--name", "a", "--listen", "127.0.0.1:0", "--vsn", "99999999999999999999"],
     "vsn must be an integer from 0 to 9223372036854775807"),
    (["launch"], "invalid choice"),
    ([], "required"),
])
def test_user_errors_are_one_line_on_stderr(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        status = main(argv)
        raise SystemExit(status)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("presence")
    assert message in err


def test_a_listen_address_in_use_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["node", "--name", "a", "--listen", f"127.0.0.1:{port}"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(f"presence: error: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_addresses_and_peers_parse() -> None:
    assert parse_address("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_address("[::1]:7000") == ("::1", 7000)
    assert parse_peer("127.0.0.1:7000") == (None, ("127.0.0.1", 7000))
    assert parse_peer("n2=127.0.0.1:7000") == ("n2", ("127.0.0.1", 7000))


def test_a_reconnect_cap_below_the_first_delay_lowers_the_first_delay() -> None:
    def backoff(*flags: str) -> Backoff:
        return backoff_from(build_parser().parse_args(
            ["node", "--name", "a", "--listen", "127.0.0.1:0", *flags]))

    assert backoff() == Backoff(initial=0.1, maximum=5.0)
    assert backoff("--reconnect-max-ms", "50") == Backoff(initial=0.05, maximum=0.05)
    assert backoff("--reconnect-max-ms", "1") == Backoff(initial=0.001, maximum=0.001)


ORCHESTRATOR = """
import asyncio, sys
from pathlib import Path
from presence.runtime.cluster import Cluster, Timing

async def main() -> None:
    async with Cluster(["solo"], Timing(), Path(sys.argv[1])) as cluster:
        print(cluster.nodes["solo"].process.pid, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_nodes_exit_when_the_process_that_started_them_is_killed(tmp_path: Path) -> None:
    env = dict(os.environ)
    impl = str(Path(__file__).resolve().parents[2] / "impl")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (impl, env.get("PYTHONPATH")) if p)
    orchestrator = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, str(tmp_path)],
                                    stdout=subprocess.PIPE, text=True, env=env)
    node = None
    try:
        assert orchestrator.stdout is not None
        node = int(orchestrator.stdout.readline())
        assert not _gone(node)
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait(10)
        deadline = time.monotonic() + 5
        while not _gone(node) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(node), "the node outlived the process that started it"
    finally:
        orchestrator.kill()
        orchestrator.wait(10)
        if node is not None and not _gone(node):
            os.kill(node, signal.SIGKILL)
    assert "solo stopped gracefully" in (tmp_path / "solo.log").read_text()
