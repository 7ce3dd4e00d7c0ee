"""A training loop you can read top to bottom.

AdamW over the trainable (adapter) parameters only — the frozen base gets no gradients and no
optimizer state — with linear warmup, then a constant or cosine learning rate, gradient
clipping, and a progress bar showing loss and tokens/s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier on the peak learning rate at ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}; use 'constant', 'linear' or 'cosine'")


def train(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: int = 0,
    schedule: str = "constant",
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Run ``steps`` optimizer steps on batches of ``{"input_ids", "attention_mask", "labels"}``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; was the adapter loaded with is_trainable=False?")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, schedule))
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="training", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate (now {lr})")
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        result.losses.append(loss.item())
        result.tokens += int(batch["attention_mask"].sum())
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{result.tokens / elapsed:.0f}")
        if on_step is not None:
            on_step(step, loss.item())
    result.seconds = time.perf_counter() - start
    model.eval()
    return result
