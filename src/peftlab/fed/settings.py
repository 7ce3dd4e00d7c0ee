"""One JSON-able description of a federated run, shared by ``peftlab fed simulate`` and a real
deployment (where it travels to the ServerApp and every ClientApp in Flower's run config).

:class:`FedArgs` holds the options a user chooses for a run (``peftlab fed simulate`` and
``peftlab fed server`` generate their shared flags from it); :meth:`FedArgs.settings` adds what
the data and the tokenizer decide. :class:`FedSettings` holds plain values; :meth:`FedSettings.task`
turns them into the :class:`~peftlab.fed.task.FedTask` every participant builds, loading the base
model with :func:`load_base` (a module-level function, so the task pickles for Ray workers).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..config import AdapterConfig
from ..data import encode_records, read_records
from ..models import load
from ..train import TrainArgs
from .spec import ServerSpec, StrategyOptions
from .task import FedTask


def load_base(model: str, kind: str, num_labels: int | None) -> nn.Module:
    """The frozen base model for rows of ``kind``: a classifier of ``num_labels`` for
    classification, else a causal language model."""
    task = "seq-cls" if kind == "classification" else "causal-lm"
    return load(model, task=task, num_labels=num_labels if task == "seq-cls" else None)[0]


@dataclass(frozen=True)
class FedSettings:
    """Everything the server and the clients of one run must agree on."""

    model: str
    """Base model: an alias (smollm2-135m-instruct, minilm-l6), a local directory or a hub id."""
    adapter: dict[str, Any]
    """The adapter config (``AdapterConfig.to_dict()``, with its ``method``)."""
    kind: str
    """Row kind of the data ("classification", "chat", ...): decides the model head."""
    label_names: list[str] | None = None
    """Classification: class index → name, the same on every client."""
    pad_id: int = 0
    """The tokenizer's padding id."""
    max_length: int | None = 256
    """Rows are cut to this many tokens, on every participant alike."""
    local_steps: int = 10
    """Optimizer steps each client trains per round (E)."""
    batch_size: int = 8
    lr: float = 1e-3
    rounds: int = 10
    clients: int = 2
    """Clients in the federation; every round waits until this many have connected."""
    seed: int = 0
    strategy: dict[str, Any] = field(default_factory=dict)
    """:class:`StrategyOptions` fields."""
    out: str | None = None
    """The server's output directory (round checkpoints, history, traffic, final adapter)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FedSettings":
        return cls(**json.loads(text))

    def strategy_options(self) -> StrategyOptions:
        return StrategyOptions(**self.strategy)

    def task(self) -> FedTask:
        options = self.strategy_options()
        return FedTask(
            build_base=partial(load_base, self.model, self.kind,
                               len(self.label_names) if self.label_names is not None else None),
            adapter=AdapterConfig.from_dict(self.adapter),
            local=TrainArgs(steps=self.local_steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                            progress=False),
            pad_id=self.pad_id, aggregation=options.aggregation)

    def server_spec(self, *, resume: bool = False) -> ServerSpec:
        return ServerSpec(rounds=self.rounds, clients=self.clients, strategy=self.strategy_options(), seed=self.seed,
                          out=self.out, resume=resume)

    def encode(self, source: str, tokenizer) -> list[dict]:
        """A participant's own data file, encoded like everyone else's."""
        records = list(read_records(source))
        return encode_records(records, tokenizer, kind=self.kind, max_length=self.max_length,
                              label_names=self.label_names).rows


@dataclass(frozen=True)
class FedArgs:
    """The options of a federated run that ``peftlab fed simulate`` and ``peftlab fed server`` share;
    their flags are generated from these fields (``--local-steps``, ...), help from the docstrings.
    The strategy's own options (``--aggregation``, ``--fraction``, DP) come from :class:`StrategyOptions`."""

    model: str = "smollm2-135m-instruct"
    """Base model: an alias (smollm2-135m-instruct, minilm-l6), a local model directory or a Hub id."""
    method: str = "lora"
    """Adapter method (lora, loha, ia3, ...); its options follow as flags (peftlab methods lists them)."""
    rounds: int = 10
    """Federated rounds."""
    local_steps: int = 10
    """Optimizer steps each client trains per round (E)."""
    batch_size: int = 8
    """Rows per local step."""
    lr: float = 1e-3
    """Clients' learning rate (AdamW)."""
    max_length: int = 256
    """Longer rows are cut to this many tokens."""
    strategy: str = "fedavg"
    """Flower strategy: fedavg, fedprox (see --proximal-mu) or fedadam (see --server-lr)."""
    seed: int = 0
    """Seed of the adapter's initialisation, client sampling and local batches (and of simulate's data split)."""
    out: Path = Path("out/fed")
    """Round checkpoints, history.jsonl, traffic.json and the final adapter/ go here."""
    resume: bool = False
    """Continue from the newest round checkpoint in --out."""

    def __post_init__(self) -> None:
        for flag, value in (("--rounds", self.rounds), ("--local-steps", self.local_steps),
                            ("--batch-size", self.batch_size), ("--max-length", self.max_length)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")

    def settings(self, adapter: AdapterConfig, options: StrategyOptions, *, kind: str, label_names: list[str] | None,
                 pad_id: int, clients: int) -> FedSettings:
        """The run's :class:`FedSettings`, with what the data decided (row kind, label names) and
        paths made absolute (Flower runs the apps in other directories)."""
        model = Path(self.model)
        return FedSettings(model=str(model.resolve()) if model.is_dir() else self.model, adapter=adapter.to_dict(),
                           kind=kind, label_names=label_names, pad_id=pad_id, max_length=self.max_length,
                           local_steps=self.local_steps, batch_size=self.batch_size, lr=self.lr, rounds=self.rounds,
                           clients=clients, seed=self.seed, strategy=dataclasses.asdict(options),
                           out=str(self.out.resolve()))
