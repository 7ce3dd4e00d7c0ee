"""Model-level adapters that prepend virtual tokens to the input (prompt-type methods).

A :class:`PromptAdapter` produces, for the rows it serves, ``num_virtual_tokens`` embeddings per
transformer stack (encoder; and decoder for encoder-decoder models, as Hugging Face PEFT does).
:func:`prepend_prompts` splices them in front of the token embeddings, once per forward:

* rows of a mixed batch may use prompts of different lengths, or none: every row gets
  ``P = max length`` slots, its own prompt right-aligned against the text and the unused slots
  masked out, so each row sees exactly what it would see alone;
* the attention mask grows by P; causal-LM labels get P leading -100s; ``token_type_ids`` get P
  zeros; decoder-only models get ``position_ids`` counted over unmasked tokens (what ``generate``
  does too), so padding and masked slots never shift positions.

The core calls this from ``PeftModel.forward``/``generate``; methods only implement ``prompt()``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from .layers import ModelAdapter
from .routing import Route

IGNORE = -100
PROMPT_KEY_PREFIX = "base_model."
"""Hugging Face PEFT keys module tensors of prompt-type adapters (e.g. a classifier head in
``modules_to_save``) as ``base_model.<path>``: there is no tuner wrapper, hence no ``.model``."""


class PromptAdapter(ModelAdapter):
    """One adapter's virtual tokens. Subclasses set the sizes and implement :meth:`prompt`."""

    num_virtual_tokens: int
    num_submodules: int = 1
    """1: prompts for the (only or encoder) stack; 2: also ``num_virtual_tokens`` for the decoder."""
    extra_inputs: tuple[str, ...] = ()
    """Forward kwargs this adapter consumes per row (e.g. ``task_ids``)."""

    def prompt(self, batch_size: int, **extra: torch.Tensor) -> torch.Tensor:
        """Virtual token embeddings, shape (batch_size, num_virtual_tokens * num_submodules, dim)."""
        raise NotImplementedError


def _rows_by_adapter(route: Route, model_adapters: nn.ModuleDict) -> dict[str, torch.Tensor | None]:
    """Which rows each prompt adapter serves (None = every row)."""
    serving = dict(route.rows_of({n for n, m in model_adapters.items() if isinstance(m, PromptAdapter)}))
    if not route.is_mixed and len(serving) > 1:
        raise ValueError(f"adapters {list(serving)} all prepend prompts; activate one prompt adapter at a time")
    return serving


def _splice(parts: list[tuple[torch.Tensor | None, torch.Tensor]], text: torch.Tensor, causal: bool):
    """Put each row's prompt in front of its text in one (B, P + T, d) tensor.

    Causal stacks: ``[unused][prompt][text]`` — the text ends every row, so generation appends
    after it. Bidirectional encoders: ``[prompt][text][unused]`` — every row starts with its
    first real token, which is what first-token poolers (BERT's [CLS]) read.
    Returns the embeddings, the prompt-slot mask (B, P + T) and each text token's column (B, T).
    """
    batch, T, dim = text.shape
    n = torch.zeros(batch, dtype=torch.long, device=text.device)
    for rows, p in parts:
        n[slice(None) if rows is None else rows] = p.shape[1]
    P = int(n.max())
    start = torch.full_like(n, P) if causal else n  # where each row's text begins
    out = text.new_zeros(batch, P + T, dim)
    prompt_slots = torch.zeros(batch, P + T, dtype=torch.long, device=text.device)
    for rows, p in parts:
        rows = torch.arange(batch, device=text.device) if rows is None else rows
        cols = (start[rows] - p.shape[1]).unsqueeze(1) + torch.arange(p.shape[1], device=text.device)
        out[rows.unsqueeze(1), cols] = p.to(out.dtype)
        prompt_slots[rows.unsqueeze(1), cols] = 1
    text_cols = start.unsqueeze(1) + torch.arange(T, device=text.device)  # (B, T)
    out = out.scatter(1, text_cols.unsqueeze(-1).expand(-1, -1, dim), text)
    return out, prompt_slots, text_cols


def _place(values: torch.Tensor, text_cols: torch.Tensor, width: int, fill) -> torch.Tensor:
    """Scatter per-token values (B, T) into a (B, width) row filled with ``fill`` elsewhere."""
    return values.new_full((values.shape[0], width), fill).scatter(1, text_cols, values)


def prepend_prompts(model: nn.Module, model_adapters: nn.ModuleDict, route: Route, kwargs: dict,
                    *, for_generate: bool = False) -> dict:
    """Return forward kwargs with each row's virtual tokens in front; unchanged if none apply."""
    ids = kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    batch = (ids if ids is not None else embeds).shape[0]
    serving = _rows_by_adapter(route, model_adapters)
    # Per-row inputs for prompt adapters (``task_ids``) are never the base model's, even for rows
    # (or whole forwards, as in ``disable_adapter()``) that no such adapter serves.
    extra_keys = {k for m in model_adapters.values() if isinstance(m, PromptAdapter) for k in m.extra_inputs}
    if not serving:
        return {k: v for k, v in kwargs.items() if k not in extra_keys} if extra_keys & kwargs.keys() else kwargs

    kwargs = dict(kwargs)
    word_embeddings = model.get_input_embeddings()
    if embeds is None:
        embeds = word_embeddings(kwargs.pop("input_ids"))
    kwargs.pop("input_ids", None)

    enc_parts, dec_parts = [], []
    for name, rows in serving.items():
        adapter = model_adapters[name]
        n_rows = batch if rows is None else rows.numel()
        missing = [k for k in adapter.extra_inputs if kwargs.get(k) is None]
        if missing:
            raise ValueError(f"adapter {name!r} needs {missing} in the forward call (one per row)")
        extra = {k: (kwargs[k] if rows is None else kwargs[k][rows]) for k in adapter.extra_inputs}
        p = adapter.prompt(n_rows, **extra)  # (rows, n * submodules, dim)
        n = adapter.num_virtual_tokens
        enc_parts.append((rows, p[:, :n]))
        if adapter.num_submodules == 2:
            dec_parts.append((rows, p[:, n:]))
    for k in extra_keys:
        kwargs.pop(k, None)

    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    causal = not encoder_decoder and _is_causal(model)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    spliced, slots, cols = _splice(enc_parts, embeds, causal)
    width = spliced.shape[1]
    kwargs["inputs_embeds"] = spliced
    kwargs["attention_mask"] = (_place(mask, cols, width, 0) + slots.to(mask.dtype)).clamp(max=1)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = _place(kwargs["token_type_ids"], cols, width, 0)

    labels = kwargs.get("labels")
    if not encoder_decoder:
        if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1]:
            kwargs["labels"] = _place(labels, cols, width, IGNORE)
        if kwargs.get("position_ids") is not None:
            raise ValueError("position_ids cannot be combined with prompt adapters: they are derived from the mask")
        if not for_generate and "position_ids" in inspect.signature(model.forward).parameters:
            kwargs["position_ids"] = (kwargs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    elif dec_parts:
        kwargs = _prepend_decoder(model, kwargs, dec_parts)
    return kwargs


def _is_causal(model: nn.Module) -> bool:
    """Whether the (decoder-only) model attends causally, read off its attention modules."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _prepend_decoder(model, kwargs, dec_parts) -> dict:
    """Encoder-decoder: decoder-side virtual tokens, as Hugging Face PEFT does for seq2seq."""
    dec = kwargs.pop("decoder_inputs_embeds", None)
    dec_ids = kwargs.pop("decoder_input_ids", None)
    labels = kwargs.get("labels")
    if dec is None:
        if dec_ids is None:
            if labels is None:
                raise ValueError("an encoder-decoder forward with decoder prompts needs decoder_input_ids or labels")
            dec_ids = model._shift_right(labels)
        dec = model.get_input_embeddings()(dec_ids)
    spliced, slots, cols = _splice(dec_parts, dec, causal=True)
    width = spliced.shape[1]
    kwargs["decoder_inputs_embeds"] = spliced
    dec_mask = kwargs.get("decoder_attention_mask")
    if dec_mask is None:
        dec_mask = torch.ones(dec.shape[:2], dtype=torch.long, device=dec.device)
    kwargs["decoder_attention_mask"] = (_place(dec_mask, cols, width, 0) + slots.to(dec_mask.dtype)).clamp(max=1)
    if labels is not None:
        kwargs["labels"] = _place(labels, cols, width, IGNORE)
    return kwargs
