"""What the server and every client agree on (:class:`FedTask`), and one client's round of local
training on it (:func:`local_update`) — plain peftlab and torch, no Flower.

Adapter states travel as ``dict[str, np.ndarray]`` of fp32 arrays keyed like
:meth:`~peftlab.PeftModel.adapter_state_dict` (``<module path>.<tensor>``); nothing of the frozen
base model ever leaves a participant.

Aggregation "stack" (FLoRA, Wang et al. 2024, https://arxiv.org/abs/2409.05976) changes what a
client trains: the global adapter is a LoRA of rank R (the stacked clients of earlier rounds); the
client extends it to rank R + r, keeps the first R directions frozen (their gradients are zeroed),
trains r fresh ones (A random, B zero) and sends back only those. Its ``lora_alpha`` is set so the
scale s = alpha / r stays the configured one whatever the rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn

from ..config import AdapterConfig
from ..data import collate
from ..model import DEFAULT, PeftModel, get_peft_model
from ..train import TrainArgs, train
from .aggregate import lora_modules

AGGREGATIONS = ("fedavg", "svd", "stack")
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class FedTask:
    """The model, adapter and local training shared by the server and all clients."""

    build_base: Callable[[], nn.Module]
    """Builds the frozen base model. Every process must get the same weights: a pretrained model, or
    a seeded tiny one. Must pickle (a module-level function or a ``functools.partial`` of one) for
    the Ray simulation, which builds it in each worker."""
    adapter: AdapterConfig
    """The adapter every client trains (for "stack", the rank r of each round's fresh directions)."""
    local: TrainArgs
    """One round of local training: ``steps`` = E local optimizer steps, ``batch_size``, ``lr``...
    (``output_dir`` must be None: clients keep nothing on disk). The seed is set per round and client."""
    pad_id: int = 0
    """Padding id of the tokenizer, for batching."""
    aggregation: str = "fedavg"
    """"fedavg" (each tensor averaged), "svd" (exact mean ΔW, truncated back to rank r) or "stack"
    (exact, rank grows each round) — see :mod:`peftlab.fed.aggregate`."""

    def __post_init__(self) -> None:
        check_aggregation(self.aggregation, self.adapter.method, getattr(self.adapter, "use_dora", False))
        if self.local.output_dir is not None:
            raise ValueError(f"FedTask.local.output_dir must be None (clients write nothing), "
                             f"got {self.local.output_dir!r}")

    def collate_fn(self) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        return partial(collate, pad_id=self.pad_id)

    def new_model(self) -> PeftModel:
        """The base model with a freshly initialised adapter named ``default``."""
        return get_peft_model(self.build_base(), self.adapter)


def check_aggregation(aggregation: str, method: str, use_dora: bool = False) -> None:
    """Refuse an aggregation the method cannot have (the exact ones re-factorise plain LoRA)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation != "fedavg" and method != "lora":
        raise ValueError(f"aggregation {aggregation!r} re-factorises LoRA's B·A, and the adapter is {method}; use "
                         f"aggregation 'fedavg' (exact for ia3, per-factor for loha)")
    if aggregation != "fedavg" and use_dora:
        raise ValueError(f"aggregation {aggregation!r} is exact for plain LoRA, not DoRA; use 'fedavg'")


def to_numpy(state: Mapping[str, torch.Tensor]) -> Arrays:
    """Adapter tensors → fp32 numpy arrays (copies), as they travel."""
    return {k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in state.items()}


def stacked_rank(arrays: Mapping[str, np.ndarray]) -> int:
    """The rank R of a LoRA state (all modules share it)."""
    pairs = lora_modules(arrays)
    ranks = {arrays[a].shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"a stacked LoRA state must have one rank for all modules, got ranks {sorted(ranks)}")
    return ranks.pop()


def with_rank(config: AdapterConfig, rank: int) -> AdapterConfig:
    """``config`` at rank ``rank`` with lora_alpha changed so the scale stays ``config.scaling``."""
    alpha = config.scaling * (math.sqrt(rank) if config.use_rslora else rank)
    return dataclasses.replace(config, r=rank, lora_alpha=alpha)


def client_seed(seed: int, round: int, client: int) -> int:
    """A training seed per (run seed, round, client): different batches and fresh directions each time."""
    return int(np.random.SeedSequence([seed, round, client]).generate_state(1)[0] >> 1)


def load_global(model: PeftModel, task: FedTask, global_arrays: Mapping[str, np.ndarray]) -> int:
    """Give ``model`` a fresh adapter ``default`` holding the global state; return the number of
    frozen leading LoRA directions (R for "stack", 0 otherwise)."""
    frozen, config = 0, task.adapter
    if task.aggregation == "stack":
        frozen = stacked_rank(global_arrays)
        config = with_rank(task.adapter, frozen + task.adapter.r)
    if DEFAULT in model.peft_config:
        model.delete_adapter(DEFAULT)
    model.add_adapter(DEFAULT, config)
    model.set_adapter(DEFAULT)
    state = model.adapter_state_dict(DEFAULT)
    factors = {k for pair in lora_modules(state).values() for k in pair} if frozen else set()
    missing, unexpected = sorted(set(state) - set(global_arrays)), sorted(set(global_arrays) - set(state))
    if missing or unexpected:
        raise ValueError(f"the global adapter does not fit this client's model: {len(missing)} tensor(s) missing "
                         f"(first: {missing[:2]}), {len(unexpected)} unexpected (first: {unexpected[:2]}); do the "
                         f"server and the clients use the same base model and adapter options?")
    with torch.no_grad():
        for key, t in state.items():
            g = torch.from_numpy(np.asarray(global_arrays[key])).to(t.dtype)
            if key in factors:  # leading R directions from the server, the rest stays freshly initialised
                (t[:frozen] if _is_a(key) else t[:, :frozen]).copy_(g)
            else:
                t.copy_(g)
    return frozen


def _is_a(key: str) -> bool:
    return key.endswith("lora_A.weight") or key.endswith("lora_embedding_A")


def _gradient_hooks(state: Mapping[str, torch.Tensor], *, frozen: int, factors: set[str],
                    anchor: Mapping[str, torch.Tensor] | None, mu: float, grad_accum: int) -> list:
    """Hooks that zero the gradients of the first ``frozen`` LoRA directions ("stack") and add
    FedProx's μ (w − w_global) (the gradient of μ/2 ‖w − w_global‖²; once per optimizer step, so
    divided by the micro-batches each step accumulates)."""
    handles = []
    for key, t in state.items():
        def hook(grad, key=key, t=t):
            if anchor is not None:
                grad = grad + (mu / grad_accum) * (t.detach() - anchor[key])
            if frozen and key in factors:
                grad = grad.clone()
                if _is_a(key):
                    grad[:frozen] = 0
                else:
                    grad[:, :frozen] = 0
            return grad
        handles.append(t.register_hook(hook))
    return handles


def local_update(model: PeftModel, task: FedTask, global_arrays: Mapping[str, np.ndarray], rows: Sequence[dict],
                 *, seed: int, proximal_mu: float = 0.0) -> tuple[Arrays, dict[str, float]]:
    """Train the global adapter on ``rows`` for ``task.local.steps`` steps; return what goes back.

    Returns (arrays, metrics): the adapter tensors as fp32 numpy arrays ("stack": only the r fresh
    LoRA directions, plus the other tensors) and ``{"num-examples": len(rows), "train-loss": mean
    loss of the local steps}``. ``proximal_mu`` > 0 adds FedProx's proximal term.
    """
    if not rows:
        raise ValueError("this client has no training rows")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    if proximal_mu and task.local.precision == "fp16":
        raise ValueError("FedProx's proximal term is added to unscaled gradients; use precision fp32 or bf16 with it")
    frozen = load_global(model, task, global_arrays)
    state = model.adapter_state_dict(DEFAULT)
    factors = {k for pair in lora_modules(state).values() for k in pair} if frozen else set()
    anchor = {k: t.detach().clone() for k, t in state.items()} if proximal_mu else None
    handles = _gradient_hooks(state, frozen=frozen, factors=factors, anchor=anchor, mu=proximal_mu,
                              grad_accum=task.local.grad_accum) if (frozen or anchor is not None) else []
    args = dataclasses.replace(task.local, seed=seed, batch_size=min(task.local.batch_size, len(rows)),
                               progress=False)
    try:
        result = train(model, rows, args=args, collate_fn=task.collate_fn())
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, t in state.items():
        if key in factors:  # "stack": only the fresh directions travel back
            t = t[frozen:] if _is_a(key) else t[:, frozen:]
        out[key] = t
    return to_numpy(out), {"num-examples": len(rows), "train-loss": float(np.mean(result.losses))}
