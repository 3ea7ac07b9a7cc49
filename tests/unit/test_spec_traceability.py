"""Every spec rule that names a model function is cited by it, and every public model function
cites rules that exist: the spec and the oracle cannot drift apart silently."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import presence_model.cluster as cluster
import presence_model.protocol as protocol
import presence_model.state as model

SPEC = Path(__file__).resolve().parents[2] / "spec" / "protocol.md"
RULE_ROW = re.compile(r"^\| ([A-Z]{2}\d+) \|.*\| (`[^|]+`) \|\s*$")
RULE_ID = re.compile(r"\b(?:ID|ST|OP|DL|MG|DF|RL|GP|FD|IN)\d+\b")


def rules_with_model_functions() -> dict[str, list[str]]:
    rules: dict[str, list[str]] = {}
    for line in SPEC.read_text(encoding="utf-8").splitlines():
        match = RULE_ROW.match(line)
        if match:
            rules[match.group(1)] = re.findall(r"`(\w+)`", match.group(2))
    return rules


def all_rule_ids() -> set[str]:
    ids = set()
    for line in SPEC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\| ([A-Z]{2}\d+) \|", line)
        if match:
            ids.add(match.group(1))
    return ids


def public_model_functions() -> dict[str, list[object]]:
    """Public functions and classes by name; a name may stand in several model modules."""
    found: dict[str, list[object]] = {}
    for module in (model, protocol, cluster):
        for name, obj in vars(module).items():
            if (
                not name.startswith("_")
                and (inspect.isfunction(obj) or inspect.isclass(obj))
                and getattr(obj, "__module__", None) == module.__name__
            ):
                found.setdefault(name, []).append(obj)
    return found


def test_spec_has_rules_with_model_functions() -> None:
    rules = rules_with_model_functions()
    assert len(rules) >= 20
    assert {"OP1", "MG3", "RL4", "GP4", "FD1", "DF1"} <= rules.keys()


def test_every_rule_is_cited_by_the_function_it_names() -> None:
    functions = public_model_functions()
    missing = []
    for rule, names in rules_with_model_functions().items():
        for name in names:
            docs = [inspect.getdoc(obj) or "" for obj in functions.get(name, [])]
            if not any(rule in doc for doc in docs):
                missing.append(f"{rule} -> {name}")
    assert not missing, f"rules not cited by their model function: {missing}"


def test_every_public_model_function_cites_existing_rules() -> None:
    known = all_rule_ids()
    for name, objs in public_model_functions().items():
        for obj in objs:
            if inspect.isfunction(obj):
                check_citations(name, obj, known)


def check_citations(name: str, obj: object, known: set[str]) -> None:
    cited = set(RULE_ID.findall(inspect.getdoc(obj) or ""))
    assert cited, f"{name} cites no rule"
    assert cited <= known, f"{name} cites unknown rules {cited - known}"
