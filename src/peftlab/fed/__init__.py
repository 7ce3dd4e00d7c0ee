"""Federated adapter training on Flower: clients train adapters on private data, only adapters travel.

Pure pieces, usable without Flower: :mod:`~peftlab.fed.partition` (IID, Dirichlet, by id),
:mod:`~peftlab.fed.aggregate` (FedAvg per tensor; exact LoRA aggregation by SVD or rank-sum
stacking), :mod:`~peftlab.fed.comms` (bytes per round) and :mod:`~peftlab.fed.task` (one client's
local training). Flower glue: :mod:`~peftlab.fed.client` (ClientApp), :mod:`~peftlab.fed.server`
(ServerApp), :mod:`~peftlab.fed.strategy` (FedAvg/FedProx/FedAdam, exact aggregation, DP),
:mod:`~peftlab.fed.simulate` (one machine), :mod:`~peftlab.fed.app` and :mod:`~peftlab.fed.deploy`
(SuperLink/SuperNode deployment). See docs/federated.md.
"""

from .aggregate import stack_lora, svd_lora, weighted_mean
from .comms import TrafficLog, model_bytes, tensor_bytes
from .partition import dirichlet, iid, parse_partition, split
from .server import FedResult, ServerSpec
from .simulate import prepare_data, simulate
from .strategy import StrategyOptions
from .task import FedTask, local_update

__all__ = ["FedResult", "FedTask", "ServerSpec", "StrategyOptions", "TrafficLog", "dirichlet", "iid", "local_update",
           "model_bytes", "parse_partition", "prepare_data", "simulate", "split", "stack_lora", "svd_lora",
           "tensor_bytes", "weighted_mean"]
