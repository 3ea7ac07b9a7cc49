"""A real cluster: three ``presence node`` processes on loopback, driven like the demo."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from presence import demo
from presence.runtime.cluster import Cluster, Timing

pytestmark = pytest.mark.e2e

QUICK = Timing(broadcast_ms=50, max_silent=4, down_ms=500, permdown_ms=10_000,
               reconnect_max_ms=200)


def test_three_processes_converge_after_a_kill_a_restart_and_a_netsplit(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    options = demo.DemoOptions(users=60, churn=40, seed=7, timing=QUICK, timeout=20.0,
                               log_dir=tmp_path, history=history)
    out = io.StringIO()
    ok, results = asyncio.run(demo.run(options, out))
    report = out.getvalue()
    assert [r.title for r in results] == [
        "1 join + churn", "2 kill n3", "3 restart n3", "4a split: each side alone", "4b heal"]
    assert ok, report
    assert "all 5 checks converged" in report
    after_kill = results[1]
    assert after_kill.totals["n3"] is None
    assert after_kill.totals["n1"] == after_kill.totals["n2"]

    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["title"] for r in records if r["kind"] == "phase"] == [r.title for r in results]
    assert {r["kind"] for r in records} == {"start", "op", "check", "phase", "kill", "split",
                                            "heal"}


def test_a_node_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    async def body() -> int | None:
        async with Cluster(["solo"], QUICK, tmp_path) as cluster:
            node = cluster.nodes["solo"]
            await node.call("track", owner="o", topic="t", key="k")
            await node.stop(timeout=10.0)
            assert node.process is not None
            return node.process.returncode
    assert asyncio.run(body()) == 0
    assert "solo stopped gracefully" in (tmp_path / "solo.log").read_text()


def test_the_command_reports_bad_flags_in_one_line_without_a_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "presence", "demo", "--seed", "x"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "--seed" in result.stderr
