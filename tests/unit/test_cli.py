"""The command line: every user error is one line on stderr and a non-zero status."""

from __future__ import annotations

import socket

import pytest

from presence.cli import main, parse_address, parse_peer


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
