"""A cluster of the implementation's sans-IO shards on an in-memory network and a virtual clock.

It has the same operations as ``presence_model.cluster`` and the same network semantics (a
broadcast goes to every other node; a message over a cut link is lost when sent and when
delivered; messages to a stopped node are lost), written independently of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from presence.core.config import Config
from presence.core.shard import Shard
from presence.core.types import Diff, Message, Output, ReplicaEvent, ReplicaId, Send


@dataclass
class ImplEnvelope:
    source: str
    destination: str
    message: Message


@dataclass
class ImplStep:
    diffs: dict[str, Diff] = field(default_factory=dict)
    events: dict[str, tuple[ReplicaEvent, ...]] = field(default_factory=dict)


class ImplCluster:
    def __init__(self, names: list[str], config: Config) -> None:
        self.config = config
        self.incarnation = dict.fromkeys(sorted(names), 1)
        self.shards = {name: Shard(ReplicaId(name, 1), config) for name in sorted(names)}
        self.running = set(names)
        self.in_flight: list[ImplEnvelope] = []
        self.cut: frozenset[tuple[str, str]] = frozenset()
        self.now = 0

    def _post(self, source: str, sends: tuple[Send, ...]) -> None:
        for send in sends:
            targets = [send.to] if send.to is not None else list(self.shards)
            for destination in targets:
                if destination != source and (source, destination) not in self.cut:
                    self.in_flight.append(ImplEnvelope(source, destination, send.message))

    def _report(self, name: str, output: Output) -> ImplStep:
        self._post(name, output.sends)
        return ImplStep({name: output.diff}, {name: output.events})

    def tick(self, name: str) -> ImplStep:
        return self._report(name, self.shards[name].tick(self.now))

    def advance(self, milliseconds: int) -> None:
        self.now += milliseconds

    def deliver(self, index: int) -> ImplStep:
        envelope = self.in_flight.pop(index)
        if envelope.destination not in self.running or (
            (envelope.source, envelope.destination) in self.cut
        ):
            return ImplStep()
        shard = self.shards[envelope.destination]
        return self._report(envelope.destination, shard.receive(envelope.message, self.now))

    def drop(self, index: int) -> None:
        del self.in_flight[index]

    def duplicate(self, index: int) -> None:
        self.in_flight.append(self.in_flight[index])

    def set_cut(self, links: frozenset[tuple[str, str]]) -> None:
        self.cut = links

    def stop(self, name: str, graceful: bool) -> None:
        if graceful:
            self._post(name, self.shards[name].shutdown().sends)
        self.running.discard(name)

    def restart(self, name: str) -> None:
        self.incarnation[name] += 1
        self.shards[name] = Shard(ReplicaId(name, self.incarnation[name]), self.config)
        self.running.add(name)
