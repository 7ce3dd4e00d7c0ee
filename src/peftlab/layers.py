"""The protocol every adapter layer follows.

An adapter layer wraps one module of the base model (``base_layer``; the base weights stay there,
frozen) and holds that module's share of one method's adapters, keyed by adapter name. It declares
its tensors per adapter (:meth:`adapter_state`), so saving, loading, averaging and optimizer setup
are plain functions over ``dict[str, Tensor]`` and never match parameter names by substring.

Mergeable methods implement :meth:`delta_weight`; :meth:`merge` and :meth:`unmerge` are generic
on top of it and only ever run when called, never from ``.train()``/``.eval()``.

A base module may store its weight compressed (:mod:`peftlab.quant`): it then offers
``dequantize()`` (a dense copy) and ``quantize_like(dense)`` (the same compression of another
module's weight); one whose ``weight`` attribute is not the dense weight (bitsandbytes' packed
codes) also offers ``dense_weight()``, which :attr:`AdapterLayer.base_weight` reads. Merging cannot
write into a compressed weight, so ``PeftModel`` swaps the dense copy in first
(:meth:`AdapterLayer.dequantize_base`) and every merge writes into that.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from . import ops
from .routing import Route, Router, RoutingError
from .targeting import unwrap


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear``, a GPT-2 ``Conv1D`` (weight stored (in, out)) or an
    ``nn.Embedding`` (vocabulary, dim)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def floating_tensor(module: nn.Module) -> torch.Tensor:
    """A floating-point parameter or buffer of ``module``: adapters beside it take its dtype and
    device (a quantised block holds integer codes too, which say neither)."""
    base = unwrap(module)
    for t in itertools.chain(base.parameters(), base.buffers()):
        if t.is_floating_point():
            return t
    for m in base.modules():  # a block of bitsandbytes layers: only packed codes
        if hasattr(m, "dense_weight"):
            return m.dense_weight()
    raise ValueError(f"{type(base).__name__} holds no floating-point tensor to take a dtype and device from")


class AdapterLayer(nn.Module):
    """Base class: one wrapped module, the adapters of one method on it."""

    mergeable: bool = False

    def __init__(self, base_layer: nn.Module, router: Router) -> None:
        super().__init__()
        self.base_layer = base_layer
        # A plain attribute (not a submodule): every layer of a model shares one router.
        self._router = router
        self.merged: list[str] = []
        # The compressed base while its dense copy stands in for merging (a submodule then).
        self.quantized_base: nn.Module | None = None

    # -- what subclasses provide -----------------------------------------------------------
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """This layer's tensors of adapter ``name``, by local key (e.g. ``lora_A.weight``)."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name`` in the layout of the base weight (mergeable methods only)."""
        raise NotImplementedError(f"{type(self).__name__} adapters cannot be merged into the base weights")

    # -- generic behaviour -------------------------------------------------------------------
    @property
    def route(self) -> Route:
        route = self._router.route
        if route.is_mixed and self.merged:
            raise RoutingError(
                f"adapter(s) {self.merged} are merged into the base weights, so rows cannot pick "
                f"adapters; call unmerge_adapter() first"
            )
        return route

    @property
    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as a dense tensor: bitsandbytes' packed NF4 codes are
        dequantised (a fresh tensor then, as for :class:`~peftlab.quant.QuantLinear`)."""
        base = unwrap(self.base_layer)
        return base.dense_weight() if hasattr(base, "dense_weight") else base.weight

    # Model code sometimes reads a sub-layer's weight (T5 checks ``wo.weight.dtype``).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(unwrap(self.base_layer), "bias", None)

    @property
    def is_conv1d(self) -> bool:
        """GPT-2's Conv1D stores its weight as (in, out): the transpose of nn.Linear's."""
        return isinstance(unwrap(self.base_layer), Conv1D)

    def _runs_inside_base(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the adapter may run inside the base layer's own GEMMs (one autograd function for
        base and adapter, as :class:`~peftlab.ops.LoraLinear` and LoHa's ``FactoredLinear`` do): a
        plain, frozen ``nn.Linear`` without hooks, input, weight and adapter in one dtype, no
        autocast, and ``ops.configure(fuse_with_base=True)`` (the default)."""
        base = self.base_layer
        if type(base) is not nn.Linear or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return False
        # Hooks on the base layer, or a forward replaced on the instance (accelerate's offloading
        # does that), must still run: those layers take the separate path.
        if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
            return False
        return (x.dtype == dtype == base.weight.dtype and not torch.is_autocast_enabled(x.device.type)
                and ops.fuse.fusing_with_base())

    def _check_merge_target(self) -> None:
        if isinstance(self.base_layer, AdapterLayer):
            raise NotImplementedError(
                f"{type(self).__name__} is stacked on a {type(self.base_layer).__name__} on the same "
                f"module; merging stacked methods is not supported — merge one method, or unload the other"
            )

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add adapter ``name``'s ΔW to the base weight. Merging twice is a no-op."""
        if name in self.merged or name not in self.adapter_names():
            return
        self._check_merge_target()
        weight = self.base_weight
        weight += self.delta_weight(name).to(weight.dtype)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged ΔW again, last merged first."""
        weight = self.base_weight
        while self.merged:
            weight -= self.delta_weight(self.merged.pop()).to(weight.dtype)

    # -- compressed bases ----------------------------------------------------------------------
    def dequantize_base(self) -> None:
        """Before merging: swap a compressed base module for its dense copy. No-op otherwise."""
        base = self.base_layer
        if not isinstance(base, AdapterLayer) and hasattr(base, "dequantize") and hasattr(base, "quantize_like"):
            self.quantized_base = base
            self.base_layer = base.dequantize()

    def restore_base(self) -> None:
        """After unmerging everything: put the compressed base back. Its codes never changed, so
        the layer is exactly as before the merge."""
        if self.quantized_base is not None and not self.merged:
            self.base_layer, self.quantized_base = self.quantized_base, None

    def requantize_base(self) -> float | None:
        """Compress the merged dense weight the way the base was compressed (for unloading: the
        merged adapters can no longer be unmerged). Returns the largest absolute weight change
        this causes, or None when the base was not compressed."""
        if self.quantized_base is None:
            return None
        dense = self.base_layer
        requantized = self.quantized_base.quantize_like(dense)
        error = (requantized.dequantize().weight.float() - dense.weight.float()).abs().max().item()
        self.base_layer, self.quantized_base = requantized, None
        return error

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, merged={self.merged}"


class ModulesToSaveLayer(AdapterLayer):
    """A full trainable copy of a small module (a classification head) per adapter.

    Hugging Face PEFT's ``modules_to_save``: the copy replaces the module for rows routed to its
    adapter. Merging swaps the copy's weights into the base module (and unmerging swaps them back),
    so ``merge_and_unload`` keeps the trained head.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, router: Router) -> None:
        super().__init__(base_layer, router)
        self.copies = nn.ModuleDict()
        self._originals: dict[str, torch.Tensor] = {}

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def add(self, name: str, config) -> None:
        import copy

        module = copy.deepcopy(unwrap(self.base_layer))
        module.requires_grad_(True)
        self.copies[name] = module

    def delete(self, name: str) -> None:
        del self.copies[name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.copies[name].named_parameters())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        route = self.route
        if route.is_mixed:
            out = self.base_layer(x, *args, **kwargs)
            # One call per distinct adapter on its rows: heads are small and run once per forward.
            for name, rows in route.rows_of(self.copies, x.device):
                if rows.numel():
                    out = out.index_copy(0, rows, self.copies[name](x[rows], *args, **kwargs).to(out.dtype))
            return out
        chosen = [n for n in route.active if n in self.copies and n not in self.merged]
        if self.merged or not chosen:
            return self.base_layer(x, *args, **kwargs)
        return self.copies[chosen[-1]](x, *args, **kwargs)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged or name not in self.copies:
            return
        if self.merged:
            raise ValueError(f"{self.merged[0]!r}'s copy is already merged here; only one head can replace the module")
        base = unwrap(self.base_layer)
        for key, p in base.named_parameters():
            self._originals[key] = p.detach().clone()
            p.copy_(self.copies[name].get_parameter(key))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = unwrap(self.base_layer)
        for key, value in self._originals.items():
            base.get_parameter(key).copy_(value)
        self._originals.clear()
        self.merged.clear()


class ModelAdapter(nn.Module):
    """A model-level adapter (one module per adapter, held by ``PeftModel.model_adapters``).

    Like layers, it declares its tensors (:meth:`adapter_state`: what trains). What is *saved* may
    differ — prefix tuning trains an MLP but saves only its output — so saving goes through
    :meth:`state_to_save` and loading through :meth:`load_saved_state`.
    """

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, by top-level key."""
        raise NotImplementedError

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return self.adapter_state()

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take tensors written by :meth:`state_to_save`; keys and shapes must match."""
        own = self.adapter_state()
        if set(own) != set(state):
            raise KeyError(f"{type(self).__name__} expects tensors {sorted(own)}, the file has {sorted(state)}")
        for key, target in own.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise ValueError(f"tensor {key}: file has shape {tuple(state[key].shape)}, "
                                 f"model expects {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(state[key].to(dtype=target.dtype, device=target.device))

    def prepare_load(self, keys: set[str], trainable: bool) -> None:
        """Called before a saved file's tensors are loaded, with the file's keys and whether it is
        loaded to keep training. An adapter whose files come in more than one layout (P-tuning:
        encoder and output, or the output alone as Hugging Face PEFT saves it) settles on the
        file's layout here, or raises if that layout cannot do what was asked. Default: nothing."""
