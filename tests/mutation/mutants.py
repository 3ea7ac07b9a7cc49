"""Deliberately broken variants of the core, to prove the fuzzers can fail.

Each mutant is one textual change to one core module. The mutated module is compiled beside the
real one and swapped in for the test harness only. A mutant whose text no longer matches the
source fails loudly, so the list cannot rot into mutants that change nothing.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path

import presence.core.shard
import presence.core.state


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # "state" or "shard"
    original: str
    replacement: str
    breaks: str  # the rule it breaks

    def source(self) -> str:
        path = Path(MODULES[self.module].__file__ or "")
        text = path.read_text(encoding="utf-8")
        count = text.count(self.original)
        if count != 1:
            raise AssertionError(f"mutant {self.name}: the original text occurs {count} times")
        return text.replace(self.original, self.replacement)

    def build(self) -> types.ModuleType:
        """Compile the mutated module under a name of its own."""
        real = MODULES[self.module]
        name = f"{real.__name__}_mutant_{self.name.replace('-', '_')}"
        module = types.ModuleType(name)
        module.__file__ = real.__file__
        sys.modules[name] = module  # dataclasses look their module up while building classes
        try:
            exec(compile(self.source(), f"<mutant {self.name}>", "exec"), module.__dict__)
        finally:
            del sys.modules[name]
        return module


MODULES: dict[str, types.ModuleType] = {"state": presence.core.state, "shard": presence.core.shard}

MUTANTS = [
    Mutant(
        "merge-ignores-out-of-order-dots",
        "state",
        "            if above and _ranges_hold(above, counter):\n                continue\n",
        "",
        "MG2: an entry whose dot was seen out of order is added again",
    ),
    Mutant(
        "observed-removal-not-relayed",
        "state",
        "                relayed.add(counter)\n",
        "",
        "DL2: a removal learnt from a peer is not passed on",
    ),
    Mutant(
        "gap-absorbed-as-contiguous",
        "state",
        "            if first <= contiguous + 1:\n                contiguous = last",
        "            if True:\n                contiguous = last",
        "MG4/ST3: a context with a gap counts as contiguous, so the missed delta is never asked",
    ),
    Mutant(
        "transfer-without-out-of-order-dots",
        "state",
        "        if cloud:\n            ranges.extend(cloud)",
        "        if False:\n            ranges.extend(cloud)",
        "DL3/GP5: a transfer reply that does not cover what the responder has seen",
    ),
    Mutant(
        "permdown-does-not-purge",
        "shard",
        "        return self.state.replica_permdown(replica)",
        "        return self.state.replica_down(replica)",
        "RL3/FD1: a permanently down replica is only hidden, never forgotten",
    ),
    Mutant(
        "older-incarnation-accepted",
        "state",
        "        return (latest is not None and replica.vsn < latest) or (",
        "        return False or (",
        "RL4/GP8: a heartbeat from an older incarnation is taken for a new one",
    ),
    Mutant(
        "update-not-atomic",
        "state",
        "        old = self._remove_own(old_counter)\n",
        "        old = self._own.pop(old_counter)\n        self._unindex(old)\n",
        "OP3: the old entry's removal never reaches the peers, who then show both",
    ),
    Mutant(
        "owner-exit-not-untracked-remotely",
        "state",
        "        for counter in counters:\n            entry = self._remove_own(counter)",
        "        for counter in counters:\n            entry = self._own.pop(counter)\n"
        "            self._unindex(entry)",
        "OP4: an owner's exit removes its presences locally only",
    ),
    Mutant(
        "down-peers-stay-visible",
        "state",
        "        if not down:\n            return entries",
        "        if True:\n            return entries",
        "ST4: entries of a down peer are still listed",
    ),
    Mutant(
        "failure-detection-not-strict",
        "shard",
        "            if silence > permdown_ms:",
        "            if silence >= permdown_ms:",
        "FD1: permdown after exactly permdown_period of silence",
    ),
    Mutant(
        "idle-heartbeat-off-by-one",
        "shard",
        "            if self._silent_ticks >= self.config.max_silent_periods:",
        "            if self._silent_ticks > self.config.max_silent_periods:",
        "GP2/G4: idle heartbeats every max_silent_periods + 1 ticks",
    ),
    Mutant(
        "dominated-peer-asked-too",
        "shard",
        "                and _dominated(clock, other_clock)",
        "                and False",
        "GP4: every peer ahead is asked, even one another ahead peer covers",
    ),
]
