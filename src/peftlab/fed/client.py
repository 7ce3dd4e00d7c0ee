"""The Flower ClientApp: receive the global adapter, train it locally, send back only the adapter.

Each train message carries the global adapter (``arrays``: fp32 arrays) and a config record
(``server-round``, ``seed``, FedProx's ``proximal-mu``). The reply carries the trained adapter
tensors, ``num-examples`` (the FedAvg weight) and ``train-loss``. The frozen base model is built
once per process and reused for every client that process serves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .strategy import as_record, message_arrays
from .task import FedTask, client_seed, local_update


class SimulatedDropout(RuntimeError):
    """A client dropping out of a round on purpose (``dropout`` > 0): it replies with an error."""


def dropped_out(seed: int, round: int, client: int, rate: float) -> bool:
    """Whether ``client`` fails in ``round`` when each client fails with probability ``rate``."""
    return rate > 0 and np.random.default_rng([seed, round, client, 1]).random() < rate


def make_client_app(task: FedTask, rows_for: Callable[[Context], Sequence[dict]], *, dropout: float = 0.0) -> ClientApp:
    """A ClientApp training ``task``'s adapter on ``rows_for(context)`` (this node's private rows).

    ``dropout``: each client raises :class:`SimulatedDropout` in a round with this probability
    (seeded by run seed, round and partition), to exercise failure handling.
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    app = ClientApp()
    cache: dict[str, object] = {}  # this process's model, built on first use

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config = message.content["config"]
        round, seed = int(config["server-round"]), int(config.get("seed", 0))
        client = int(context.node_config.get("partition-id", context.node_id))
        if dropped_out(seed, round, client, dropout):
            raise SimulatedDropout(f"client {client} dropped out of round {round} (simulated, dropout={dropout})")
        if "model" not in cache:
            cache["model"] = task.new_model()
        arrays, metrics = local_update(cache["model"], task, message_arrays(message), rows_for(context),
                                       seed=client_seed(seed, round, client),
                                       proximal_mu=float(config.get("proximal-mu", 0.0)))
        content = RecordDict({"arrays": as_record(arrays), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=message)

    return app
