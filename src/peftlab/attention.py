"""Model-level adapters that act inside attention: extra keys/values per layer (prefix tuning,
P-tuning v2) and gated prompt attention added to a layer's output (LLaMA-Adapter).

transformers 5 calls every modern model's attention through ``ALL_ATTENTION_FUNCTIONS`` with
``config._attn_implementation`` as the key. :func:`install` registers ``peftlab_<impl>`` — a
function that calls the original implementation — and points the model's config at it. Inside,
the attention module (``module.layer_idx``) tells which layer is running, and the model's
:class:`~peftlab.routing.Router` which rows use which adapter:

* ``prefix_kv`` tensors (B, kv_heads, P, head_dim) are concatenated in front of the keys and
  values, and the mask grows by P columns (unused slots masked for rows with shorter prefixes
  or none). They are added at every call and never enter the KV cache, so generation,
  any cache type and gradient checkpointing (which recomputes layers) need nothing special;
* ``gated_output`` (B, Q, heads, head_dim) is added to the attention output.

Prefix positions: a prefix of P tokens sits at positions 0..P-1 and the text starts at P (Li &
Liang; Hugging Face PEFT gets this from its KV-cache route). A forward pre-hook on the base
model adds each row's P to its ``position_ids``, in ``forward`` and in every ``generate`` step.
Models with a relative position bias per (query, key) pair (T5) get no position ids: there the
prefix columns of the bias are computed for keys at 0..P-1 and queries from P on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .layers import ModelAdapter
from .routing import Route, Router

_CROSS_NAMES = ("EncDecAttention", "crossattention", "encoder_attn", "cross_attn")


class AttentionAdapter(ModelAdapter):
    """One adapter's contribution inside attention. Subclasses implement either hook."""

    num_virtual_tokens: int = 0
    """How far this adapter's prefix shifts the text's positions (0: no shift)."""

    def prefix_kv(self, site: "Site", module: nn.Module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Extra (keys, values), each (batch_size, kv_heads, P, head_dim), for this layer; None: none."""
        return None

    def gated_output(self, site: "Site", module: nn.Module, query: torch.Tensor) -> torch.Tensor | None:
        """Addition to the attention output, (rows, Q, heads, head_dim), from the (rows, heads, Q, head_dim)
        queries of the rows this adapter serves; None: nothing for this layer."""
        return None


@dataclass(eq=False)
class Site:
    """An attention module's place: which layer of which stack. Stored on the module (plain attribute)."""

    layer: int
    stack: str  # "decoder" (decoder-only models and the decoder of seq2seq) or "encoder"
    owner: Any  # _Attached, shared by all sites of one model
    bias_source: nn.Module | None = None
    """The module of this stack that computes its relative position bias (``compute_bias``: T5's
    first layer, whose bias every layer of the stack reuses); None for models without one."""


@dataclass(eq=False)
class _Attached:
    router: Router
    adapters: nn.ModuleDict  # the PeftModel's model-level adapters (referenced here, not owned)
    original: str            # the attention implementation before install


def self_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path, module, stack) of every self-attention module with a ``layer_idx``."""
    found = []
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    for path, module in model.named_modules():
        if getattr(module, "layer_idx", None) is None or not hasattr(module, "config"):
            continue
        if any(part in _CROSS_NAMES for part in path.split(".")) or ".base_layer" in path:
            continue
        stack = "encoder" if encoder_decoder and path.split(".")[0] == "encoder" else \
            ("decoder" if encoder_decoder or not _bidirectional(module) else "encoder")
        found.append((path, module, stack))
    return found


def _bidirectional(module: nn.Module) -> bool:
    return getattr(module, "is_causal", True) is False


def install(model: nn.Module, router: Router, adapters: nn.ModuleDict) -> None:
    """Route the model's attention through peftlab's function (once per model)."""
    if any(hasattr(m, "_peftlab_site") for m in model.modules()):
        return
    original = model.config._attn_implementation or "eager"
    if original.startswith("peftlab_"):
        return
    _register(original)
    owner = _Attached(router, adapters, original)
    sites = self_attention_modules(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no self-attention modules with a layer_idx; "
                         f"attention-based adapters need a model that uses transformers' attention interface")
    for _, module, stack in sites:
        module._peftlab_site = Site(module.layer_idx, stack, owner, _bias_source(module, stack, sites))
        # Seq2seq stacks read their own copy of the config (T5 deep-copies it per stack).
        module.config._attn_implementation = f"peftlab_{original}"
    model.config._attn_implementation = f"peftlab_{original}"
    model.register_forward_pre_hook(_ShiftPositions(owner), with_kwargs=True)


def _bias_source(module: nn.Module, stack: str, sites: list[tuple[str, nn.Module, str]]) -> nn.Module | None:
    """The module itself if it owns a relative position bias (UMT5: every layer), else the first of its stack (T5)."""
    for candidate in [module] + [m for _, m, s in sites if s == stack]:
        if getattr(candidate, "has_relative_attention_bias", False) and hasattr(candidate, "compute_bias"):
            return candidate
    return None


def uninstall(model: nn.Module) -> None:
    for m in model.modules():
        site = m.__dict__.pop("_peftlab_site", None)
        if site is not None:
            model.config._attn_implementation = m.config._attn_implementation = site.owner.original
    for key, hook in list(model._forward_pre_hooks.items()):
        if getattr(hook, "_peftlab", False):
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)


def _register(original: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"peftlab_{original}"
    AttentionInterface.register(name, _attention)
    if original in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


def _original_function(module: nn.Module, original: str):
    if original == "eager":
        # Each model file defines its own eager function (T5 adds position_bias, GPT-2 scales ...).
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original]


def _serving(route: Route, adapters: nn.ModuleDict, device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
    """(adapter name, rows it serves — on ``device`` — or None for all rows) for the attention
    adapters in ``route``."""
    return route.rows_of({n for n, m in adapters.items() if isinstance(m, AttentionAdapter)}, device)


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    fn = _original_function(module, module.config._attn_implementation.removeprefix("peftlab_"))
    site: Site | None = getattr(module, "_peftlab_site", None)
    if site is None:  # attention we do not adapt (cross-attention) runs as before
        return fn(module, query, key, value, attention_mask, **kwargs)
    owner = site.owner
    serving = _serving(owner.router.route, owner.adapters, query.device)
    if not serving:
        return fn(module, query, key, value, attention_mask, **kwargs)

    batch = query.shape[0]
    parts = []
    for name, rows in serving:
        kv = owner.adapters[name].prefix_kv(site, module, batch if rows is None else rows.numel())
        if kv is not None:
            parts.append((rows, kv))
    if parts:
        key, value, attention_mask, kwargs = _with_prefix(site, module, query, key, value, attention_mask, kwargs, parts)
    out, weights = fn(module, query, key, value, attention_mask, **kwargs)

    for name, rows in serving:
        q = query if rows is None else query[rows]
        extra = owner.adapters[name].gated_output(site, module, q)
        if extra is not None:
            out = out + extra.to(out.dtype) if rows is None else out.index_add(0, rows, extra.to(out.dtype))
    return out, weights


def _with_prefix(site, module, query, key, value, mask, kwargs, parts):
    """Concatenate per-row prefix keys/values (padded to the longest, right-aligned) and widen mask and bias."""
    batch, _, q_len, _ = query.shape
    kv_heads, head_dim = key.shape[1], key.shape[3]
    P = max(k.shape[2] for _, (k, _) in parts)
    pk = key.new_zeros(batch, kv_heads, P, head_dim)
    pv = value.new_zeros(batch, kv_heads, P, head_dim)
    used = torch.zeros(batch, P, dtype=torch.bool, device=key.device)
    for rows, (k, v) in parts:
        n = k.shape[2]
        sel = slice(None) if rows is None else rows
        pk[sel, :, P - n:] = k.to(key.dtype)
        pv[sel, :, P - n:] = v.to(value.dtype)
        used[sel, P - n:] = True

    k_len = key.shape[2]
    if mask is None:
        causal = q_len > 1 and getattr(module, "is_causal", False) and kwargs.get("is_causal", True) is not False
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=key.device)
        if causal:
            allowed = torch.tril(allowed, diagonal=k_len - q_len)
        mask = allowed.expand(batch, 1, q_len, k_len)
    mask = mask.expand(batch, mask.shape[1], q_len, mask.shape[-1])
    prefix = used[:, None, None, :].expand(batch, mask.shape[1], q_len, P)
    if mask.dtype == torch.bool:
        mask = torch.cat([prefix, mask], dim=-1)
    else:
        blocked = torch.finfo(mask.dtype).min
        mask = torch.cat([torch.where(prefix, 0.0, blocked).to(mask.dtype), mask], dim=-1)
    kwargs = dict(kwargs)
    kwargs.pop("is_causal", None)
    bias = kwargs.get("position_bias")
    if bias is not None:  # T5: one bias column per key, so the prefix keys need theirs
        prefix_bias = _prefix_bias(site, module, q_len, k_len, P).to(bias.dtype)
        kwargs["position_bias"] = torch.cat([prefix_bias.expand(bias.shape[0], -1, -1, -1), bias], dim=-1)
    return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), mask, kwargs


def _prefix_bias(site: Site, module: nn.Module, q_len: int, k_len: int, P: int) -> torch.Tensor:
    """Relative position bias of the P prefix columns, (1, heads, Q, P).

    A row's n prefix tokens sit at positions 0..n-1 and its text from n on (Hugging Face PEFT's
    cache route: the prefix is the cache, T5 counts the text after it). Keys are the cached text
    and the Q queries (k_len - Q before them), so query q is at n + k_len - Q + q. Prefixes are
    right-aligned in P columns, so column c holds prefix token c - (P - n): the distance
    c - P - (k_len - Q + q) is the same for every n, and one bias serves all rows.
    """
    source = site.bias_source
    if source is None:
        raise ValueError(f"{type(module).__name__} (layer {site.layer} of the {site.stack}) adds a position_bias "
                         f"per key, but no attention module of its stack has compute_bias and "
                         f"has_relative_attention_bias; prefix keys need bias columns of their own — add this "
                         f"architecture's bias module to peftlab/attention.py (_bias_source)")
    past = k_len - q_len
    return source.compute_bias(q_len, P + k_len, past_seen_tokens=P + past)[..., :P]


class _ShiftPositions:
    """Forward pre-hook: the text of a row with a P-token prefix starts at position P.

    An object rather than a closure: ``copy.deepcopy`` of the model copies it along with the
    model, so the copy's hook reads the copy's router (a closure would keep reading the original's).
    """

    _peftlab = True

    def __init__(self, owner: _Attached) -> None:
        self.owner = owner

    def __call__(self, module, args, kwargs):
        owner = self.owner
        if getattr(module.config, "is_encoder_decoder", False):
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            return None
        serving = [(owner.adapters[n].num_virtual_tokens, rows)
                   for n, rows in _serving(owner.router.route, owner.adapters, ref.device)]
        serving = [(p, rows) for p, rows in serving if p]
        if not serving:
            return None
        batch, length = ref.shape[0], ref.shape[1]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = _default_positions(kwargs, batch, length, ref.device)
        offset = torch.zeros(batch, dtype=positions.dtype, device=positions.device)
        for p, rows in serving:
            offset[slice(None) if rows is None else rows] = p
        kwargs = dict(kwargs)
        kwargs["position_ids"] = positions + offset.view(-1, *([1] * (positions.dim() - 1)))
        return args, kwargs


def _default_positions(kwargs, batch, length, device):
    """What the model would use: counted over unmasked tokens, after what the cache holds."""
    mask = kwargs.get("attention_mask")
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    if mask is not None and mask.dim() == 2:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, -length:]
    return torch.arange(past, past + length, device=device).expand(batch, length)
