"""The conformance vectors (spec/vectors/, format in spec/vectors.md) are current, cover every rule
of spec/protocol.md and every fault class, and are well-formed and self-consistent.

Replaying them through the implementation is tests/test_regressions.py; here they are checked as
data, so that a vector that no longer shows what it claims fails even if both sides agree.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import presence_model.history as mh

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "spec" / "vectors"
SPEC = ROOT / "spec" / "protocol.md"
FORMAT_DOC = ROOT / "spec" / "vectors.md"
PATHS = sorted(VECTORS.glob("*.json"))

Json = Any

# The real-world fault classes every vector set must show, by their id in the `faults` field.
FAULT_CLASSES = {
    "a": "catch-up",
    "b": "relay-after-split",
    "c": "old-incarnation",
    "d": "stale-transfer",
    "e": "silence-and-shutdown",
    "f": "churn-within-period",
    "g": "duplicate-reorder",
}

STEP_FIELDS = {
    "track": {"node", "owner", "topic", "key", "meta"},
    "untrack": {"node", "owner", "topic", "key"},
    "update": {"node", "owner", "topic", "key", "meta"},
    "untrack_owner": {"node", "owner"},
    "tick": {"node"},
    "advance": {"ms"},
    "deliver": {"index"},
    "drop": {"index"},
    "duplicate": {"index"},
    "cut": {"links"},
    "heal": set(),
    "stop": {"node", "graceful"},
    "restart": {"node"},
}
CONFIG_FIELDS = {
    "broadcast_period", "max_silent_periods", "down_period", "permdown_period",
    "clock_sample_periods",
}
HEAD_FIELDS = {"format", "name", "description", "rules", "faults", "nodes", "config", "steps",
               "expect"}


@functools.cache
def generator() -> ModuleType:
    """spec/vectors/generate.py is a script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("vector_generator", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@functools.cache
def load(path: Path) -> Json:
    return json.loads(path.read_text(encoding="utf-8"))


def vectors() -> list[Json]:
    return [load(path) for path in PATHS]


def spec_rule_ids() -> set[str]:
    text = SPEC.read_text(encoding="utf-8")
    return set(re.findall(r"^\| ([A-Z]{2}\d+) \|", text, flags=re.MULTILINE))


# --- (i) the files are what the generator produces -----------------------------------------------


def test_regeneration_is_byte_identical() -> None:
    assert PATHS, "no vectors in spec/vectors"
    assert generator().check() == []


def test_check_names_stale_missing_and_stray_files(tmp_path: Path) -> None:
    names = [path.name for path in PATHS]
    for path in PATHS[1:]:
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    changed = tmp_path / names[1]
    changed.write_text(changed.read_text(encoding="utf-8").replace("a.1", "a.2", 1),
                       encoding="utf-8")
    (tmp_path / "stray.json").write_text("{}\n", encoding="utf-8")
    assert generator().check(tmp_path) == sorted([names[0], names[1], "stray.json"])


# --- (ii) rules ----------------------------------------------------------------------------------


def test_every_spec_rule_is_exercised_by_a_vector() -> None:
    cited = {rule for vector in vectors() for rule in vector["rules"]}
    assert len(spec_rule_ids()) >= 40
    assert spec_rule_ids() - cited == set()


def test_vectors_cite_only_rules_of_the_spec() -> None:
    known = spec_rule_ids()
    unknown = {v["name"]: sorted(set(v["rules"]) - known) for v in vectors()}
    assert {name: rules for name, rules in unknown.items() if rules} == {}


# --- (iii) fault classes -------------------------------------------------------------------------


def test_every_fault_class_has_a_vector() -> None:
    tagged = {fault for vector in vectors() for fault in vector["faults"]}
    assert set(FAULT_CLASSES.values()) <= tagged
    assert set(generator().FAULTS) == set(FAULT_CLASSES.values())


def deliveries(vector: Json) -> Iterator[tuple[int, list[str], Json]]:
    """(step number, [source, destination, kind, sender], observation after) of each delivery."""
    previous: list[list[str]] = []
    for number, (step, seen) in enumerate(zip(vector["steps"], vector["expect"], strict=True)):
        if step["do"] == "deliver":
            yield number, previous[step["index"]], seen
        previous = seen["in_flight"]


def _ref(presence: Json) -> str:
    return str(presence[3]["phx_ref"])


def shows_catch_up(vector: Json) -> bool:
    """A heartbeat was lost and a transfer_ack later changed what its destination lists."""
    dropped = {
        vector["expect"][n - 1]["in_flight"][s["index"]][1]
        for n, s in enumerate(vector["steps"])
        if s["do"] == "drop" and vector["expect"][n - 1]["in_flight"][s["index"]][2] == "heartbeat"
    }
    return any(
        kind == "transfer_ack" and destination in dropped and destination in seen["diffs"]
        for _, (_, destination, kind, _), seen in deliveries(vector)
    )


def shows_relay(vector: Json) -> bool:
    """With links cut, a node reports a leave it learnt from a node that does not own it."""
    if not any(step["do"] == "cut" for step in vector["steps"]):
        return False
    return any(
        kind == "heartbeat"
        and any(not _ref(p).startswith(sender + ".")
                for p in seen["diffs"].get(destination, {}).get("leaves", []))
        for _, (_, destination, kind, sender), seen in deliveries(vector)
    )


def shows_old_incarnation(vector: Json) -> bool:
    """After a restart, a heartbeat of the node's earlier incarnation is delivered to no effect."""
    restarted = any(step["do"] == "restart" for step in vector["steps"])
    return restarted and any(
        kind == "heartbeat"
        and sender != seen["nodes"][source]["replica"]
        and destination not in seen["diffs"]
        and destination not in seen["events"]
        for _, (source, destination, kind, sender), seen in deliveries(vector)
    )


def shows_stale_transfer(vector: Json) -> bool:
    """A heartbeat that changed its destination overtook a transfer_ack on the same link, and the
    ack then changed nothing."""
    overtaken: set[tuple[str, str]] = set()
    for number, (source, destination, kind, _), seen in deliveries(vector):
        if kind == "heartbeat" and destination in seen["diffs"]:
            before = vector["expect"][number - 1]["in_flight"]
            if [source, destination, "transfer_ack"] in [row[:3] for row in before]:
                overtaken.add((source, destination))
        if kind == "transfer_ack" and (source, destination) in overtaken:
            return destination not in seen["diffs"]
    return False


def shows_churn(vector: Json) -> bool:
    """One delivered delta holds an update (a join with phx_ref_prev) and a re-track (a join
    without it whose handle also leaves)."""
    for _, (_, destination, kind, _), seen in deliveries(vector):
        diff = seen["diffs"].get(destination)
        if kind != "heartbeat" or diff is None:
            continue
        left = {tuple(p[:3]) for p in diff["leaves"]}
        updated = [p for p in diff["joins"] if "phx_ref_prev" in p[3] and tuple(p[:3]) in left]
        rejoined = [p for p in diff["joins"] if "phx_ref_prev" not in p[3]
                    and tuple(p[:3]) in left]
        if updated and rejoined:
            return True
    return False


def shows_duplicate_and_reorder(vector: Json) -> bool:
    """A message is duplicated, and one is delivered ahead of an earlier one on its link."""
    duplicated = any(step["do"] == "duplicate" for step in vector["steps"])
    reordered = False
    previous: list[list[str]] = []
    for step, seen in zip(vector["steps"], vector["expect"], strict=True):
        if step["do"] == "deliver":
            link = previous[step["index"]][:2]
            reordered |= any(row[:2] == link for row in previous[: step["index"]])
        previous = seen["in_flight"]
    return duplicated and reordered


def silence_and_shutdown_events(vector: Json) -> set[str]:
    """Which of: down by a tick, permdown by a tick, permdown by a graceful_permdown."""
    shown = set()
    for step, seen in zip(vector["steps"], vector["expect"], strict=True):
        if step["do"] == "tick":
            kinds = {kind for kind, _ in seen["events"].get(step["node"], [])}
            shown |= {f"tick:{kind}" for kind in kinds & {"down", "permdown"}}
    for _, (_, destination, kind, _), seen in deliveries(vector):
        if kind == "graceful_permdown" and ["permdown"] in [
            e[:1] for e in seen["events"].get(destination, [])
        ]:
            shown.add("graceful:permdown")
    return shown


FAULT_EVIDENCE: dict[str, Callable[[Json], bool]] = {
    "catch-up": shows_catch_up,
    "relay-after-split": shows_relay,
    "old-incarnation": shows_old_incarnation,
    "stale-transfer": shows_stale_transfer,
    "churn-within-period": shows_churn,
    "duplicate-reorder": shows_duplicate_and_reorder,
}


@pytest.mark.parametrize("fault", sorted(FAULT_EVIDENCE))
def test_some_vector_of_a_fault_class_shows_it(fault: str) -> None:
    tagged = [v for v in vectors() if fault in v["faults"]]
    assert any(FAULT_EVIDENCE[fault](v) for v in tagged), f"no vector tagged {fault} shows it"


def test_silence_and_shutdown_vectors_show_down_permdown_and_graceful_stop() -> None:
    tagged = [v for v in vectors() if "silence-and-shutdown" in v["faults"]]
    shown = set().union(*(silence_and_shutdown_events(v) for v in tagged))
    assert shown == {"tick:down", "tick:permdown", "graceful:permdown"}
    assert any(
        step["do"] == "stop" and step["graceful"] for v in tagged for step in v["steps"]
    )


# --- (iv) well-formed and self-consistent --------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_vector_is_well_formed(path: Path) -> None:
    vector = load(path)
    assert set(vector) == HEAD_FIELDS
    assert vector["format"] == mh.FORMAT
    assert vector["name"] == path.stem
    assert vector["description"].strip()
    assert vector["rules"] and len(set(vector["rules"])) == len(vector["rules"])
    assert set(vector["faults"]) <= set(FAULT_CLASSES.values())
    assert set(vector["config"]) == CONFIG_FIELDS
    nodes = vector["nodes"]
    assert nodes and len(set(nodes)) == len(nodes)
    assert len(vector["expect"]) == len(vector["steps"])
    for step in vector["steps"]:
        assert set(step) - {"do"} == STEP_FIELDS[step["do"]], step
    for seen in vector["expect"]:
        assert set(seen) == {"error", "diffs", "events", "nodes", "in_flight"}
        assert set(seen["nodes"]) == set(nodes)


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_diffs_account_for_every_change_of_a_list(path: Path) -> None:
    """DF1: applying a node's diff to its previous list gives its new list (a restart starts a
    new, empty list); a failed local operation changes nothing at all."""
    vector = load(path)
    previous: Json = None
    for step, seen in zip(vector["steps"], vector["expect"], strict=True):
        if seen["error"] is not None:
            assert step["do"] in ("track", "update")
            assert previous is not None and {**seen, "error": None} == {
                **previous, "diffs": {}, "events": {}, "error": None
            }
        for name, node in seen["nodes"].items():
            if step["do"] == "restart" and step["node"] == name:
                assert node["presences"] == [] and node["peers"] == {}
                continue
            before: list[Json] = [] if previous is None else previous["nodes"][name]["presences"]
            diff = seen["diffs"].get(name, {"joins": [], "leaves": []})
            expected = Counter(map(_canonical, before))
            expected.subtract(map(_canonical, diff["leaves"]))
            expected.update(map(_canonical, diff["joins"]))
            # Counter equality ignores zero counts but not negative ones: a leave of a presence
            # that was not listed fails here.
            assert expected == Counter(map(_canonical, node["presences"])), (name, step)
        previous = seen


def _canonical(presence: Json) -> str:
    return json.dumps(presence, sort_keys=True)


@pytest.mark.parametrize(
    "path", [p for p in PATHS if "IN1" in load(p)["rules"]],
    ids=[p.name for p in PATHS if "IN1" in load(p)["rules"]],
)
def test_vectors_citing_convergence_end_converged(path: Path) -> None:
    """IN1: at the end nothing is in flight and every running node lists exactly the presences
    that the running nodes list as their own (a presence's ref names the replica that made it)."""
    final = load(path)["expect"][-1]
    running = {name: node for name, node in final["nodes"].items() if node["running"]}
    own = sorted(
        (p for node in running.values() for p in node["presences"]
         if _ref(p).startswith(node["replica"] + ".")),
        key=_canonical,
    )
    assert final["in_flight"] == []
    assert own, "a converged vector should list something"
    for name, node in running.items():
        assert sorted(node["presences"], key=_canonical) == own, name


def test_format_document_lists_every_vector_and_fault_class() -> None:
    text = FORMAT_DOC.read_text(encoding="utf-8")
    missing = [p.stem for p in PATHS if f"`{p.stem}`" not in text]
    missing += [f for f in FAULT_CLASSES.values() if f"`{f}`" not in text]
    assert missing == []
