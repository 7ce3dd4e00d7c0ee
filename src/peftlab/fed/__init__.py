"""Federated adapter training on Flower: clients train adapters on private data, only adapters travel.

Pure pieces, usable without Flower: :mod:`~peftlab.fed.partition` (IID, Dirichlet, by id),
:mod:`~peftlab.fed.aggregate` (FedAvg per tensor; exact LoRA aggregation by SVD or rank-sum
stacking), :mod:`~peftlab.fed.comms` (bytes per round) and :mod:`~peftlab.fed.task` (one client's
local training). Flower glue: :mod:`~peftlab.fed.client` (ClientApp), :mod:`~peftlab.fed.server`
(ServerApp), :mod:`~peftlab.fed.strategy` (FedAvg/FedProx/FedAdam, exact aggregation, DP),
:mod:`~peftlab.fed.simulate` (one machine), :mod:`~peftlab.fed.app` and :mod:`~peftlab.fed.deploy`
(SuperLink/SuperNode deployment). See docs/federated.md.

Flower is an optional dependency (``pip install 'peftlab[fed]'``): importing this package does not
need it; the names that do (:func:`simulate`, :func:`prepare_data`, :class:`FedResult`) import it
when first used.
"""

from importlib import import_module

from .aggregate import stack_lora, svd_lora, weighted_mean
from .comms import TrafficLog, model_bytes, tensor_bytes
from .partition import dirichlet, iid, parse_partition, split
from .spec import ServerSpec, StrategyOptions
from .task import FedTask, local_update

_NEEDS_FLOWER = {"FedResult": ".server", "prepare_data": ".simulate", "simulate": ".simulate"}


def __getattr__(name: str):
    if name not in _NEEDS_FLOWER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = import_module(_NEEDS_FLOWER[name], __name__)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != "flwr":
            raise
        raise ModuleNotFoundError(f"peftlab.fed.{name} needs Flower, which is not installed; "
                                  f"pip install 'peftlab[fed]'", name="flwr") from err
    value = getattr(module, name)
    globals()[name] = value
    return value

__all__ = ["FedResult", "FedTask", "ServerSpec", "StrategyOptions", "TrafficLog", "dirichlet", "iid", "local_update",
           "model_bytes", "parse_partition", "prepare_data", "simulate", "split", "stack_lora", "svd_lora",
           "tensor_bytes", "weighted_mean"]
