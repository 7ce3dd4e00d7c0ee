"""What a federated run's server decides, as plain values: how it samples, aggregates and privatises
(:class:`StrategyOptions`) and the run around it (:class:`ServerSpec`).

No Flower here: ``peftlab fed``'s flags are generated from these dataclasses, and the ``peftlab``
command line must start (and ``peftlab train`` run) where Flower, an optional dependency
(``pip install 'peftlab[fed]'``), is not installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .task import AGGREGATIONS, FedTask

STRATEGIES = ("fedavg", "fedprox", "fedadam")


@dataclass(frozen=True)
class StrategyOptions:
    """How the server samples, aggregates and (optionally) privatises. The field docstrings are
    also the help of ``peftlab fed simulate|server`` (``--aggregation``, ``--fraction``, ...)."""

    name: str = "fedavg"
    """"fedavg", "fedprox" (clients add μ/2 ‖w − w_global‖²) or "fedadam" (Adam on the server over
    the averaged update, Reddi et al. 2021)."""
    aggregation: str = "fedavg"
    """fedavg (each tensor averaged), or for LoRA svd (the exact mean ΔW, cut back to rank r) or stack
    (exact; the rank grows each round); docs/federated.md says which to use when."""
    fraction: float = 1.0
    """Share of the clients sampled each round (at least one)."""
    proximal_mu: float = 0.01
    """FedProx's μ: clients add μ/2 ‖w − w_global‖² to their loss (strategy fedprox)."""
    server_lr: float = 0.01
    """FedAdam's server learning rate η (strategy fedadam)."""
    dp_noise: float = 0.0
    """Central differential privacy: Gaussian noise multiplier (σ = noise × clip / sampled clients);
    0 = off."""
    dp_clip: float = 1.0
    """Central DP: each client's update (its adapter minus the global one) is clipped to this L2 norm."""

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.name!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction of clients per round must be in (0, 1], got {self.fraction}")
        if self.aggregation != "fedavg" and self.name == "fedadam":
            raise ValueError(f"fedadam keeps Adam moments per tensor, which mean nothing once {self.aggregation!r} "
                             f"re-factorises the adapter each round; use --strategy fedavg or fedprox with it")
        if self.aggregation == "stack" and self.name == "fedprox":
            raise ValueError("with 'stack' aggregation clients train fresh directions each round, so FedProx has no "
                             "global value to pull them to; use --strategy fedavg")
        if self.dp_noise < 0 or self.dp_clip <= 0:
            raise ValueError(f"DP needs noise >= 0 and clip > 0, got noise {self.dp_noise}, clip {self.dp_clip}")
        if self.dp_noise and self.aggregation != "fedavg":
            raise ValueError("central DP calibrates its noise to a plain average of clipped updates; use "
                             "--aggregation fedavg with --dp-noise")

    def sampled(self, clients: int) -> int:
        """Clients sampled per round out of ``clients``."""
        return max(1, int(clients * self.fraction))



@dataclass(frozen=True)
class ServerSpec:
    """Everything the server decides."""

    rounds: int
    clients: int
    """Clients in the federation (the server waits until this many have connected)."""
    strategy: StrategyOptions = field(default_factory=StrategyOptions)
    seed: int = 0
    eval_batch_size: int = 32
    out: str | None = None
    """Where round checkpoints, ``history.jsonl``, ``traffic.json`` and the final ``adapter/`` go."""
    resume: bool = False
    """Continue from the newest round checkpoint in ``out``."""

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.clients < 1:
            raise ValueError(f"rounds and clients must be >= 1, got rounds={self.rounds}, clients={self.clients}")
        if self.resume and self.out is None:
            raise ValueError("resume needs an output directory (--out) holding round checkpoints")

    def fingerprint(self, task: FedTask) -> dict[str, Any]:
        """What must not change between a run and its resumption (as JSON gives it back: lists, not tuples)."""
        return json.loads(json.dumps({"method": task.adapter.method, "adapter": task.adapter.to_dict(),
                                      "aggregation": task.aggregation, "strategy": self.strategy.name,
                                      "clients": self.clients, "seed": self.seed}))
