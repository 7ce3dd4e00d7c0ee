"""Evaluation on held-out rows: loss and perplexity for language models, accuracy for classifiers."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def evaluate(model: torch.nn.Module, rows: Sequence[dict], collate_fn: Callable[[list[dict]], dict], *,
             batch_size: int, max_batches: int = 0, autocast: contextlib.AbstractContextManager | None = None
             ) -> dict[str, float]:
    """Evaluate ``model`` on ``rows`` in order, ``batch_size`` rows per batch (``max_batches`` of
    them; 0 = all). Leaves the model in eval mode.

    Language models (labels ``(B, T)``, -100 = not scored): ``eval_loss`` is the mean cross-entropy
    over every label token of every row — weighted by tokens, not a mean of batch means — and
    ``perplexity`` = exp(eval_loss). Position t predicts label t + 1 for decoder-only models and
    label t for encoder-decoders; logits of virtual tokens in front (prompt methods) are not scored.

    Classifiers (labels ``(B,)`` class ids, logits ``(B, C)``): ``eval_loss`` is the mean
    cross-entropy per row and ``accuracy`` the share of rows whose argmax is the label.

    ``autocast`` is entered around each forward (the training loop passes its precision's).
    """
    rows = first_batches(rows, batch_size, max_batches)
    sums = eval_sums(model, rows, collate_fn, batch_size=batch_size, autocast=autocast)
    return metrics_from_sums(sums, len(rows))


def first_batches(rows: Sequence[dict], batch_size: int, max_batches: int) -> Sequence[dict]:
    """The rows that ``max_batches`` batches of ``batch_size`` take from the front (all when 0)."""
    return rows[:max_batches * batch_size] if max_batches else rows


@torch.no_grad()
def eval_sums(model: torch.nn.Module, rows: Sequence[dict], collate_fn: Callable[[list[dict]], dict], *,
              batch_size: int, autocast: contextlib.AbstractContextManager | None = None) -> list[float]:
    """``[loss sum, scored count, correct, is classification]`` over ``rows``, in batches of
    ``batch_size``: what :func:`evaluate` averages. Sums add up across shards of the rows (the
    training loop's processes each score a share and add them; see :func:`metrics_from_sums`).
    Leaves the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    shift = not getattr(model.config, "is_encoder_decoder", False)
    loss_sum, count, correct, classification = 0.0, 0, 0, False
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate_fn(list(rows[start:start + batch_size])).items()}
        labels = batch["labels"]
        with autocast or contextlib.nullcontext():
            logits = model(**batch).logits.float()
        if labels.dim() == 1:  # class ids: logits (B, C)
            classification = True
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            count += labels.shape[0]
            continue
        logits = logits[:, -labels.shape[1]:]  # the caller's positions: (B, T, V)
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss_sum += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((labels != IGNORE).sum())
    return [loss_sum, count, correct, float(classification)]


def metrics_from_sums(sums: Sequence[float], n_rows: int) -> dict[str, float]:
    """:func:`evaluate`'s metrics from :func:`eval_sums`' sums (of one or several shards of
    ``n_rows`` rows in all)."""
    loss_sum, count, correct, classification = sums
    if count == 0:
        raise ValueError(f"the {n_rows} eval rows hold no label to score (all -100?); check the eval data")
    loss = loss_sum / count
    out: dict[str, Any] = {"eval_loss": loss}
    if classification:
        out["accuracy"] = correct / count
    else:
        out["perplexity"] = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    return out
