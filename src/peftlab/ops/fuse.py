"""Sibling layers that read one input share the work on it.

A transformer block feeds one tensor to several adapted projections (attention's q, k and v; an
MLP's gate and up). Their down-projections A x are independent, so one matmul against the
concatenation [A_q; A_k; A_v] computes them all: the input is read once and there are fewer,
larger kernels. :class:`SiblingGroup` is the rendezvous: the first sibling that sees an input
computes every sibling's share and leaves the others' shares here, keyed on that exact tensor
(identity, and its version counter where it has one); each sibling takes its own. A sibling whose
input is a different tensor, or whose share is missing, computes its own — so sharing can only
save work, never change a result.

Shares live in the router's ``scratch`` (:class:`peftlab.routing.Router`), which is emptied when a
forward's route scope ends, so nothing outlives a forward even if a sibling never ran.

``configure(fuse_shared_input=False)`` turns sharing off (every layer computes its own product).
``configure(fuse_with_base=False)`` keeps a training step's adapter out of the base layer's GEMMs
(:class:`~peftlab.ops.LoraLinear`, LoHa's ``FactoredLinear``): base and adapter then run as
separate autograd nodes, as in inference.
"""

from __future__ import annotations

import weakref

import torch

_OPTIONS = {"fuse_shared_input": True, "fuse_with_base": True}
# Inputs with fewer token rows than this are not shared on the single-adapter path: handing the
# parts over costs more Python than the kernels it saves (measured, CPU, 1 thread, q/k/v of
# SmolLM2's shapes: 4 rows ~65 µs slower shared; 128 rows the same either way).
SHARE_MIN_TOKENS = 64


def configure(**options: bool) -> None:
    """Set runtime options of the kernels, e.g. ``configure(fuse_shared_input=False)``.

    ``fuse_shared_input``: layers reading one input share one down-projection matmul (default True).
    ``fuse_with_base``: where a gradient is needed, a single adapter on a plain frozen ``nn.Linear``
    runs inside the base layer's GEMMs, one autograd node (default True).
    """
    for key, value in options.items():
        if key not in _OPTIONS:
            raise ValueError(f"peftlab.ops.configure: unknown option {key!r}; options are {sorted(_OPTIONS)}")
        if not isinstance(value, bool):
            raise TypeError(f"peftlab.ops.configure: {key} must be True or False, got {value!r}")
    _OPTIONS.update(options)


def options() -> dict[str, bool]:
    """The current runtime options (a copy)."""
    return dict(_OPTIONS)


def fusing() -> bool:
    return _OPTIONS["fuse_shared_input"]


def fusing_with_base() -> bool:
    return _OPTIONS["fuse_with_base"]


def _version(x: torch.Tensor) -> int:
    # Inference tensors keep no version counter; they cannot be written outside inference mode.
    return -1 if x.is_inference() else x._version


class SiblingGroup:
    """Layers with one parent and one input width; shares are handed over through a scratch dict.

    Members are held by weak reference: a layer removed from the model does not stay alive here.
    ``plan`` is free for the members' owner to cache how it shares (e.g. a fused stack per route),
    ``skip`` to remember a (route, input shape) where sharing does not pay.
    """

    def __init__(self, members) -> None:
        self._members = [weakref.ref(m) for m in members]
        self.plan = None
        self.skip: tuple = (None, None)

    def members(self) -> list:
        return [m for m in (r() for r in self._members) if m is not None]

    def take(self, scratch: dict, member, x: torch.Tensor):
        """``member``'s share of the products of ``x`` if a sibling left one, else None.

        A member handed a share made from another tensor does not read its siblings' input (an
        attention output projection has the width of q, k and v but reads what attention made of
        them): it leaves the group, and no sibling computes for it again — but only in a forward
        without autograd. Gradient checkpointing recomputes a forward during backward and requires
        the same operations with the same shapes, so membership must not change between a
        training forward and its backward (do not run a no-grad forward of the same model in
        between: it may shrink a group)."""
        entry = scratch.get(self)
        if entry is None:
            return None
        mine = entry[0] is x and entry[1] == _version(x)
        share = entry[2].pop(member, None)
        if not entry[2]:
            del scratch[self]
        if mine:
            return share
        if share is not None and not torch.is_grad_enabled():
            self._members = [r for r in self._members if r() is not member]
            self.plan = None
        return None

    def leave(self, scratch: dict, x: torch.Tensor, shares: dict) -> None:
        """Leave ``shares`` (member → share) of the products of ``x`` for the members to take."""
        if shares:
            scratch[self] = (x, _version(x), shares)
        else:
            scratch.pop(self, None)
