"""Flower strategies for adapters: FedAvg, FedProx and FedAdam as Flower ships them, exact LoRA
aggregation on top of FedAvg/FedProx, and Flower's central differential privacy wrapper.

Flower's strategies average each array of the clients' replies (weighted by ``num-examples``).
:class:`ExactLoraAggregation` replaces that one step, ``aggregate_train``, with the exact
aggregations of :mod:`peftlab.fed.aggregate`; sampling, failures and metrics stay Flower's.
:class:`RoundLog` wraps the finished strategy to number rounds after a resume and to keep each
round's aggregated training metrics for the progress line.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from .aggregate import stack_onto, svd_lora
from .spec import StrategyOptions
from .task import stacked_rank, to_numpy

WEIGHT_KEY = "num-examples"


def message_arrays(message: Message) -> dict[str, np.ndarray]:
    """The arrays a message carries (its one ArrayRecord), as numpy."""
    record = next(iter(message.content.array_records.values()))
    return {k: v.numpy() for k, v in record.items()}


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays → the ArrayRecord a message carries."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class ExactLoraAggregation:
    """Mixin for FedAvg and FedProx: ``aggregate_train`` by the exact LoRA aggregations.

    "svd": the weighted mean of the clients' B_i A_i, truncated back to rank ``rank``; the largest
    relative truncation error over modules is reported as the ``svd-residual`` metric. "stack": the
    global adapter (frozen on the clients) stacked with the clients' fresh directions weighted by
    their shares, so the rank grows by Σ r_i each round.
    """

    def __init__(self, *args: Any, aggregation: str, rank: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aggregation, self.rank = aggregation, rank
        self.global_arrays: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_arrays = {k: v.numpy() for k, v in arrays.items()}  # "stack" builds on it
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        states = [{k: torch.from_numpy(v) for k, v in message_arrays(m).items()} for m in valid]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if self.aggregation == "svd":
            state, residuals = svd_lora(states, weights, self.rank)
            metrics["svd-residual"] = max(residuals.values())
        else:
            previous = {k: torch.from_numpy(v) for k, v in self.global_arrays.items()}
            state = stack_onto(previous, states, weights)
            metrics["rank"] = stacked_rank(state)
        return as_record(to_numpy(state)), metrics


class RoundLog(Strategy):
    """Wraps a strategy: its rounds are numbered from ``first_round`` (continuing a resumed run),
    each round's client sample is drawn from (seed, round) alone — so a resumed run samples what
    the uninterrupted one would have — and each round's aggregated training metrics are kept in
    :attr:`train_metrics`."""

    def __init__(self, strategy: Strategy, *, first_round: int = 1, seed: int = 0) -> None:
        self.strategy, self.offset, self.seed = strategy, first_round - 1, seed
        self.train_metrics: dict[int, dict[str, float]] = {}

    def configure_train(self, server_round, arrays, config, grid):
        # Flower samples nodes with Python's global `random`; numpy's (DP noise) is left alone.
        random.seed(int(np.random.SeedSequence([self.seed, server_round + self.offset]).generate_state(1)[0]))
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = self.strategy.aggregate_train(server_round + self.offset, replies)
        self.train_metrics[server_round + self.offset] = dict(metrics or {})
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()


def build_strategy(options: StrategyOptions, *, clients: int, rank: int | None) -> Strategy:
    """The Flower strategy for ``options`` over ``clients`` clients (``rank``: the LoRA rank, for "svd").

    Every round samples ``options.sampled(clients)`` clients and waits until all ``clients`` have
    connected; a client that fails is left out of that round's average (Flower's FedAvg counts it
    as a failure and aggregates the rest). Client-side evaluation is off: the server evaluates.
    """
    common = dict(fraction_train=options.fraction, fraction_evaluate=0.0, min_train_nodes=1,
                  min_available_nodes=clients, weighted_by_key=WEIGHT_KEY)
    cls = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}[options.name]
    extra = {"proximal_mu": options.proximal_mu} if options.name == "fedprox" else {}
    if options.name == "fedadam":
        extra = {"eta": options.server_lr}
    if options.aggregation == "fedavg":
        strategy = cls(**common, **extra)
    else:
        exact = type(f"{cls.__name__}{options.aggregation.upper()}", (ExactLoraAggregation, cls), {})
        strategy = exact(**common, **extra, aggregation=options.aggregation, rank=rank)
    if options.dp_noise:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=options.dp_noise, clipping_norm=options.dp_clip,
            num_sampled_clients=options.sampled(clients))
    return strategy
