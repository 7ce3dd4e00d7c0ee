"""Causal-LM cross-entropy without the (B, T, vocab) logits.

A training step through a frozen base needs, per labelled position, only the loss and the gradient
with respect to the final hidden state. :func:`causal_lm_loss` computes both from the positions
whose (shifted) label is not ``ignore_index``, ``chunk_size`` rows at a time, through the output
head's own forward (a quantised head, a head with a bias or an adapter-wrapped head all work):

    loss = Σ_i (logsumexp_v z_iv − z_i,y_i) / n,   z_i = head(h_i) in fp32,   n = #labelled or
                                                   num_items_in_batch
    ∂loss/∂h_i = (softmax(z_i) − onehot(y_i)) · ∂z_i/∂h_i / n

The gradient is computed chunk by chunk in the forward pass, while each chunk's logits exist anyway,
and kept as (N, d) rows — the size of the hidden rows a recomputing backward would have to keep — so
the head runs once per chunk instead of twice, and backward only scales by the incoming gradient.
At most one chunk's (chunk_size, vocab) logits and their gradient are alive at any time; nothing of
vocabulary width is saved for backward.

The result equals ``transformers``' ``ForCausalLMLoss`` on ``head(hidden)`` (position t predicts
label t + 1; mean over labelled positions, or their sum / ``num_items_in_batch``; NaN when no position
is labelled and no ``num_items_in_batch`` is given, with zero gradients), to fp32 rounding.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 256
"""Rows per chunk on the CPU: with a 49k vocabulary, 256 rows of fp32 logits are 50 MB (and as much
again for their gradient). On SmolLM2 at 8×128 this peaked 270 MiB lower than 1024 rows at the same
step time (BENCHMARKS.md, lean step), and the head's matmuls stay large enough to run at full speed."""
DEFAULT_CHUNK_SIZE_GPU = 4096
"""Rows per chunk on a GPU, where each chunk's kernels cost launch time whatever their size: on an
H100 (SmolLM2 bf16, 16×1024) 4096 rows stepped in 175 ms against 196 ms for 256, peaking at 12 860
against 11 061 MiB (BENCHMARKS.md, lean step on a GPU)."""

HeadContext = Callable[[torch.Tensor], ContextManager]


def check_chunk_size(chunk_size: object, caller: str) -> None:
    """Refuse a ``chunk_size`` that is neither None (the device's default) nor an integer >= 1,
    naming ``caller``."""
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{caller}: chunk_size must be an integer >= 1 (rows per head call) or None "
                         f"(the device's default), got chunk_size={chunk_size!r}")


def default_chunk_size(device: torch.device) -> int:
    """:data:`DEFAULT_CHUNK_SIZE` on the CPU, :data:`DEFAULT_CHUNK_SIZE_GPU` on an accelerator."""
    return DEFAULT_CHUNK_SIZE if device.type == "cpu" else DEFAULT_CHUNK_SIZE_GPU


def causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, *,
                   num_items_in_batch: torch.Tensor | int | None = None, chunk_size: int | None = None,
                   ignore_index: int = IGNORE_INDEX, head_context: HeadContext | None = None) -> torch.Tensor:
    """Shifted causal-LM cross-entropy of ``head(hidden)`` against ``labels``, a scalar fp32 tensor.

    Args:
        hidden: final hidden states (B, T, d), any float dtype; the loss accumulates in fp32.
        head: the output head; called on (n, d) rows, returns (n, vocab) logits. Its parameters
            that require grad get their gradients, summed over the chunks in fp32.
        labels: (B, T) token ids, ``ignore_index`` where nothing is scored; position t predicts
            ``labels[:, t + 1]``, the last position predicts nothing.
        num_items_in_batch: divide the summed loss by this instead of the number of labelled
            positions (``transformers``' convention for gradient accumulation).
        chunk_size: labelled rows per call of ``head``; None: :func:`default_chunk_size` of
            ``hidden``'s device.
        head_context: called with the batch row (B index) of each of a chunk's positions, (n,);
            returns a context entered around that chunk's ``head`` call (e.g. a per-row route for
            adapters inside the head).
    """
    check_chunk_size(chunk_size, "causal_lm_loss")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"causal_lm_loss needs hidden (B, T, d) and labels (B, T); got hidden "
                         f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}")
    chunk_size = chunk_size or default_chunk_size(hidden.device)
    labels = labels.to(hidden.device)
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T): the token position t predicts
    scored = shifted != ignore_index
    rows = scored.nonzero()[:, 0]  # (N,) batch row of each labelled position
    targets = shifted[scored]  # (N,)
    # Under no_grad (evaluation) nothing gets a gradient, so none is made.
    params = list(dict.fromkeys(p for p in head.parameters() if p.requires_grad)) if torch.is_grad_enabled() else []
    total = _ChunkedCrossEntropy.apply(hidden[scored], targets, rows, head, chunk_size, head_context, *params)
    if num_items_in_batch is None:
        return total / targets.numel()  # NaN for no labelled position, as torch's mean over nothing
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Σ over rows of (logsumexp(head(h)) − head(h)[target]), with the per-row gradient made in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, head: nn.Module,
                chunk_size: int, head_context: HeadContext | None, *params: torch.Tensor) -> torch.Tensor:
        # hidden (N, d) labelled rows; targets, rows (N,). Forward runs without grad; gradients are
        # made explicitly per chunk below when anything upstream wants them.
        want_hidden = ctx.needs_input_grad[0]
        want_params = [p for p, want in zip(params, ctx.needs_input_grad[6:]) if want]
        needs_grad = want_hidden or bool(want_params)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(hidden) if want_hidden else None  # (N, d), per unit of loss sum
        d_params = [torch.zeros_like(p, dtype=torch.float32) for p in want_params]
        buffer = None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end].detach().requires_grad_(want_hidden)
            with torch.enable_grad() if needs_grad else contextlib.nullcontext():
                with head_context(rows[start:end]) if head_context is not None else contextlib.nullcontext():
                    logits = head(h).float()  # (n, V)
            z = logits.detach()
            target_logit = z.gather(1, targets[start:end, None]).squeeze(1)
            if not needs_grad:
                total += (z.logsumexp(-1) - target_logit).sum()
                continue
            # logsumexp and softmax from one exp: e = exp(z − max), lse = max + log Σe, softmax = e / Σe
            # (four passes over the (n, V) chunk, where logsumexp and then exp(z − lse) take six).
            top = z.amax(-1, keepdim=True)  # (n, 1)
            # One (chunk, V) buffer for every chunk's d_logits: a fresh tensor this size per chunk
            # is a fresh mmap on the CPU, and its page faults cost as much as the exp itself.
            if buffer is None:
                buffer = torch.empty((min(chunk_size, hidden.shape[0]), z.shape[1]), dtype=z.dtype, device=z.device)
            d_logits = torch.sub(z, top, out=buffer[: end - start]).exp_()
            sums = d_logits.sum(-1, keepdim=True)  # (n, 1), ≥ 1
            total += (top.squeeze(1) + sums.log().squeeze(1) - target_logit).sum()
            # d(Σ loss)/d logits = softmax − onehot: entries in [-1, 1], so no fp16 underflow here;
            # the 1/n scale and the caller's loss scaling come in backward.
            d_logits.div_(sums)
            d_logits[torch.arange(end - start, device=d_logits.device), targets[start:end]] -= 1
            grads = torch.autograd.grad(logits, ([h] if want_hidden else []) + want_params, d_logits,
                                        allow_unused=True)
            if want_hidden:
                d_hidden[start:end] = grads[0]
                grads = grads[1:]
            for acc, g in zip(d_params, grads):
                if g is not None:
                    acc += g
            del logits, d_logits, grads  # free this chunk's (n, V) logits before the next
        ctx.save_for_backward(d_hidden if want_hidden else None)
        ctx.d_params = list(zip(d_params, [p.dtype for p in want_params]))
        ctx.param_wanted = ctx.needs_input_grad[6:]
        ctx.any_rows = hidden.shape[0] > 0
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        (d_hidden,) = ctx.saved_tensors
        grad_hidden = None if d_hidden is None else (d_hidden.float() * grad_total).to(d_hidden.dtype)
        grad_params, d_params = [], iter(ctx.d_params)
        for wanted in ctx.param_wanted:
            acc, dtype = next(d_params) if wanted else (None, None)
            if acc is not None:  # zero without a labelled row, where grad_total may be inf (1 / 0 rows)
                acc = (acc * grad_total if ctx.any_rows else acc).to(dtype)
            grad_params.append(acc)
        return (grad_hidden, None, None, None, None, None, *grad_params)
