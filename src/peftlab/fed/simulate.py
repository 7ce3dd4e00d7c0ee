"""A federation on one machine: data split over simulated clients, Flower's Ray-based simulation
engine running the ServerApp and one ClientApp per client.

:func:`prepare_data` reads and encodes a data file once, holds out the server's evaluation rows and
splits the rest over the clients (:mod:`peftlab.fed.partition`); :func:`simulate` runs the
rounds. ``backend="ray"`` is Flower's simulation engine (a Ray worker per CPU, clients run in
parallel); ``backend="in-process"`` runs the same apps sequentially in this process
(:mod:`peftlab.fed.local_grid`) — no Ray start-up, which suits tests and small machines.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..data import EncodedData, encode_records, read_records
from .client import make_client_app
from .local_grid import InProcessGrid, run_in_process
from .partition import PartitionSpec, describe, split
from .server import FedResult, make_server_app
from .spec import ServerSpec
from .task import FedTask

BACKENDS = ("ray", "in-process")


@dataclass
class FedData:
    """Encoded rows split for a federation."""

    partitions: list[list[dict]]
    """Each client's private training rows."""
    eval_rows: list[dict]
    """The server's held-out rows."""
    encoded: EncodedData
    """The encoded training file (kind, label names, counts)."""
    lines: list[str]
    """What the split looks like, one line per client."""


def prepare_data(source: str, tokenizer, *, clients: int, partition: PartitionSpec, seed: int = 0,
                 eval_source: str | None = None, eval_share: float = 0.1, max_length: int | None = None) -> FedData:
    """Encode ``source``; hold out ``eval_share`` of it for the server (or encode ``eval_source``
    instead); split the rest over ``clients`` by ``partition``."""
    records = list(read_records(source))
    raw = [row for _, row in records]
    encoded = encode_records(records, tokenizer, max_length=max_length)
    if len(encoded.rows) != len(raw):  # encode_records keeps row order; packing would not
        raise ValueError(f"{source}: encoding changed the number of rows ({len(raw)} -> {len(encoded.rows)})")
    order = np.random.default_rng(seed).permutation(len(raw))
    if eval_source is not None:
        eval_rows = encode_records(list(read_records(eval_source)), tokenizer, max_length=max_length,
                                   kind=encoded.kind, label_names=encoded.label_names).rows
        train_ids = sorted(order.tolist())
    else:
        if not 0 < eval_share < 1:
            raise ValueError(f"the server's held-out share must be in (0, 1), got {eval_share}; or pass --eval-data")
        held = int(round(len(raw) * eval_share))
        eval_rows = [encoded.rows[i] for i in sorted(order[:held].tolist())]
        train_ids = sorted(order[held:].tolist())
    labels: list[Hashable] | None = None
    if encoded.kind == "classification":
        labels = [encoded.rows[i]["labels"] for i in train_ids]
    parts = split(partition, [raw[i] for i in train_ids], clients, seed, labels=labels)
    names = encoded.label_names
    shown = [names[label] for label in labels] if labels is not None and names else labels
    return FedData(partitions=[[encoded.rows[train_ids[j]] for j in part] for part in parts], eval_rows=eval_rows,
                   encoded=encoded, lines=describe(parts, shown))


def _partition_rows(partitions: Sequence[Sequence[dict]], context) -> Sequence[dict]:
    return partitions[int(context.node_config["partition-id"])]


def simulate(task: FedTask, partitions: Sequence[Sequence[dict]], spec: ServerSpec, *, eval_rows: Sequence[dict] = (),
             dropout: float = 0.0, backend: str = "ray", cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
             report: Callable[[str], None] = print, verbose: bool = False) -> FedResult:
    """Run ``spec.rounds`` rounds over ``len(partitions)`` simulated clients; return the result.

    ``dropout``: each client fails a round with this probability (a round completes with the rest).
    ``cpus_per_client`` / ``gpus_per_client``: Ray resources per client, which set how many train at
    once. ``verbose`` shows Flower's own log lines.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if len(partitions) != spec.clients:
        raise ValueError(f"{len(partitions)} partitions for {spec.clients} clients")
    result = FedResult()
    server = make_server_app(task, spec, eval_rows=eval_rows, result=result, report=report)
    client = make_client_app(task, partial(_partition_rows, [list(p) for p in partitions]), dropout=dropout)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.INFO if verbose else logging.CRITICAL)  # failures show in our round lines
    try:
        if backend == "in-process":
            run_in_process(server, InProcessGrid(client, spec.clients))
        else:
            from flwr.simulation import run_simulation

            # Ray's advice about a future default for GPU visibility, printed on every start.
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            backend_config: dict[str, Any] = {
                "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
                "init_args": {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose},
            }
            run_simulation(server_app=server, client_app=client, num_supernodes=spec.clients,
                           backend_config=backend_config, verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
    return result
