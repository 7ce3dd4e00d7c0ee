"""The lean training forward: a causal LM's loss from its labelled positions, without its logits.

:meth:`PeftModel.lean_loss <peftlab.model.PeftModel.lean_loss>` turns it on; ``PeftModel.forward``
then calls :func:`lean_forward`, which either serves the call or returns None (the ordinary forward
follows). It copies no model code: the model's own forward runs with ``labels=None`` while its output
head (``get_output_embeddings()``) is swapped for :class:`_HeadInput`, which keeps the head's input
— the final hidden states (B, T, d) exactly as the model feeds them to its head — and returns a small
(B, T, 2) marker in place of the logits. :func:`peftlab.ops.causal_lm_loss` then computes the loss
through the real head, chunk by chunk, at the labelled positions only.

The marker proves the model does nothing to its logits after the head: it must come back unchanged.
A model that soft-caps or rescales them (Gemma 2's ``final_logit_softcapping``, Cohere's
``logit_scale``, Granite's ``logits_scaling``), calls its head more than once or not once per
position, fails it; that model is remembered and served by its ordinary forward from then on, with
one warning, so the loss is never silently different from the model's own.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn as nn
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils import ModelOutput

from .ops.loss import HeadContext, causal_lm_loss
from .targeting import unwrap

logger = logging.getLogger(__name__)
_MARKER = (1.0, -3.0)  # any elementwise change of the logits (scale, shift, tanh cap) moves one of them
_REFUSED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
"""Models whose forward failed the marker check, with the reason."""


class _HeadInput(nn.Module):
    """Stands in for the output head during a lean forward: keeps its input, returns the marker."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.calls, self.extra_args = 0, False

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        self.hidden, self.extra_args = hidden, bool(args or kwargs)
        return _marker(hidden)

    def problem(self, out: Any, labels: torch.Tensor) -> str | None:
        """Why the model's output shows the lean loss would differ from its own; None if it would not."""
        if isinstance(out, Exception):
            return f"its forward fails once the output head is replaced ({type(out).__name__}: {out})"
        if self.calls != 1 or self.extra_args:
            return f"it calls its output head {self.calls} time(s){' with extra arguments' if self.extra_args else ''}"
        if self.hidden.shape[:2] != labels.shape:
            return (f"it feeds its head {tuple(self.hidden.shape)} for labels {tuple(labels.shape)}, "
                    f"not one row per position")
        logits = out.get("logits") if isinstance(out, ModelOutput) else None
        if logits is None or out.get("loss") is not None:
            return "its output is not the usual (loss, logits, ...) of a causal LM"
        expected = _marker(self.hidden)
        if logits.shape != expected.shape or not torch.equal(logits.to(expected.dtype), expected):
            return "it changes the logits after the output head (soft-capping or scaling)"
        return None


def _marker(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, 2): the values the stand-in head returns in place of logits."""
    return hidden.new_tensor(_MARKER).expand(*hidden.shape[:-1], len(_MARKER)).clone()


def refusal(model: nn.Module, kwargs: dict[str, Any]) -> str | None:
    """Why a call with ``kwargs`` cannot take the lean path on ``model``; None if it can."""
    config = getattr(model, "config", None)
    labels = kwargs.get("labels")
    if not (torch.is_tensor(labels) and labels.dim() == 2):
        return "no (B, T) labels"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder"
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if not isinstance(head, nn.Module):
        return "no output head (get_output_embeddings() is None)"
    if getattr(unwrap(head), "out_features", None) not in (None, getattr(config, "vocab_size", None)):
        return "its head's width is not config.vocab_size (the logits are cut after the head)"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "its loss is not transformers' causal-LM cross-entropy"
    if kwargs.get("logits_to_keep") or "shift_labels" in kwargs or "ignore_index" in kwargs:
        return "logits_to_keep, shift_labels or ignore_index given"
    if kwargs.get("return_dict") is False or not getattr(config, "return_dict", True):
        return "return_dict=False"
    if kwargs.get("output_router_logits", getattr(config, "output_router_logits", False)):
        return "the router's auxiliary loss is added to the model's loss"
    return _REFUSED.get(model)


def lean_forward(model: nn.Module, kwargs: dict[str, Any], *, chunk_size: int | None,
                 head_context: HeadContext | None = None) -> ModelOutput | None:
    """``model(**kwargs)`` with ``loss`` computed by :func:`~peftlab.ops.causal_lm_loss` and
    ``logits=None``; None (and nothing run) where :func:`refusal` gives a reason, or where the
    model failed the marker check (then it ran once and is refused from now on)."""
    if refusal(model, kwargs) is not None:
        return None
    head = model.get_output_embeddings()
    path = next((name for name, module in model.named_modules() if module is head), "")
    if not path:
        return None
    stand_in = _HeadInput()
    model.set_submodule(path, stand_in)
    try:
        out = model(**{**kwargs, "labels": None})
    except Exception as exc:  # after the head, a failure is the marker's doing (e.g. a bias of vocab width)
        if stand_in.calls == 0:
            raise
        out = exc
    finally:
        model.set_submodule(path, head)
    labels = kwargs["labels"]
    problem = stand_in.problem(out, labels)
    if problem is not None:
        _REFUSED[model] = problem
        logger.warning("lean loss: %s does not fit the lean path (%s); it computes its loss with full logits "
                       "from now on", type(model).__name__, problem)
        return None
    loss = causal_lm_loss(stand_in.hidden, head, labels, num_items_in_batch=kwargs.get("num_items_in_batch"),
                          chunk_size=chunk_size, head_context=head_context)
    return type(out)(loss=loss, **{k: v for k, v in out.items() if k not in ("loss", "logits")})

