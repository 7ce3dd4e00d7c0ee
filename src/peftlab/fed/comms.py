"""Communication accounting: the bytes of adapter tensors sent each round, and what full-model
FedAvg would have sent instead.

Bytes are tensor payload bytes (elements × bytes per element; adapters travel as fp32), counted
per message: a round that sends the global adapter to n clients and gets n replies moves
n × (adapter bytes) down and n × (adapter bytes) up. Flower's serialisation adds a small header
per array (dtype and shape, about a hundred bytes) and the message envelope; those are not
counted, so the numbers compare payloads like for like.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn


def tensor_bytes(state: Mapping[str, Any]) -> int:
    """Payload bytes of a dict of tensors or numpy arrays."""
    total = 0
    for value in state.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        else:
            array = np.asarray(value)
            total += array.size * array.itemsize
    return total


def model_bytes(model: nn.Module, bytes_per_element: int = 4) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors once), at fp32 by default:
    what one full-model FedAvg message would carry."""
    seen, elements = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            elements += t.numel()
    return elements * bytes_per_element


def human(n: float) -> str:
    """1536 → "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class RoundTraffic:
    """What one round moved."""

    round: int
    down: int = 0
    """Bytes sent to clients (one copy of the arrays per message)."""
    up: int = 0
    """Bytes received from clients that replied (failed clients send nothing)."""
    messages_down: int = 0
    messages_up: int = 0


@dataclass
class TrafficLog:
    """Bytes per round and in total, next to full-model FedAvg over the same messages."""

    full_model_bytes: int
    """Bytes of the whole model, for the comparison."""
    rounds: list[RoundTraffic] = field(default_factory=list)

    def record(self, round: int, *, down: Iterable[int] = (), up: Iterable[int] = ()) -> RoundTraffic:
        """Add the byte counts of messages sent (``down``) and received (``up``) in ``round``."""
        if not self.rounds or self.rounds[-1].round != round:
            self.rounds.append(RoundTraffic(round))
        entry = self.rounds[-1]
        for n in down:
            entry.down += n
            entry.messages_down += 1
        for n in up:
            entry.up += n
            entry.messages_up += 1
        return entry

    @property
    def total_down(self) -> int:
        return sum(r.down for r in self.rounds)

    @property
    def total_up(self) -> int:
        return sum(r.up for r in self.rounds)

    @property
    def full_model_total(self) -> int:
        """What full-model FedAvg would have moved: one whole model per message, both ways."""
        return sum(r.messages_down + r.messages_up for r in self.rounds) * self.full_model_bytes

    def summary(self) -> str:
        sent = self.total_down + self.total_up
        ratio = self.full_model_total / sent if sent else float("nan")
        return (f"sent {human(self.total_down)} down + {human(self.total_up)} up = {human(sent)} in "
                f"{len(self.rounds)} round(s); full-model FedAvg: {human(self.full_model_total)} ({ratio:,.0f}× more)")

    def to_dict(self) -> dict[str, Any]:
        return {"full_model_bytes": self.full_model_bytes, "total_down": self.total_down, "total_up": self.total_up,
                "full_model_total": self.full_model_total, "rounds": [asdict(r) for r in self.rounds]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrafficLog":
        return cls(data["full_model_bytes"], [RoundTraffic(**r) for r in data["rounds"]])
