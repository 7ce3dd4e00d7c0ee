"""Who uses which adapter in a forward pass.

A :class:`Route` is decided once per forward by :class:`~peftlab.model.PeftModel` and read by
every adapter layer through the model's shared :class:`Router`. Two shapes:

* ``Route(active=("a", "b"))`` — every row of the batch uses adapters a and b (stacked);
  ``Route()`` is the plain base model. This is the fast path.
* ``Route(per_example=("a", "__base__", "b", ...))`` — one adapter name per row: a mixed-task
  batch. Layers turn it into an index tensor once (:meth:`Route.index`) and gather per-row
  weights, so no layer loops over adapters in Python.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Container, Iterator

import torch

BASE = "__base__"
"""Name of the "no adapter" row in a per-example route."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")


class RoutingError(ValueError):
    """A forward was asked for an adapter that does not exist or cannot be routed now."""


def check_adapter_name(name: str) -> None:
    """Adapter names become module keys and folder names: keep them plain."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == BASE:
        raise RoutingError(
            f"invalid adapter name {name!r}: use letters, digits, '_' or '-' "
            f"(at most 128 characters, not starting with '_' or '-'); {BASE!r} is reserved"
        )


@dataclass(frozen=True)
class Route:
    active: tuple[str, ...] = ()
    """Adapters applied to every row (summed), when ``per_example`` is None."""
    per_example: tuple[str, ...] | None = None
    """One adapter name (or ``BASE``) per row of the batch."""
    _index_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_mixed(self) -> bool:
        return self.per_example is not None

    @cached_property
    def names(self) -> tuple[str, ...]:
        """The distinct adapters this route uses, in first-seen order (``BASE`` excluded)."""
        rows = self.per_example if self.per_example is not None else self.active
        return tuple(dict.fromkeys(n for n in rows if n != BASE))

    def index(self, device: torch.device) -> torch.Tensor:
        """Per-row slot into :attr:`names`, shape (B,); ``BASE`` rows get ``len(names)``.

        Layers stack their per-adapter tensors in :attr:`names` order plus one zero slot at the
        end, then gather with this index. Cached per device for the whole forward.
        """
        idx = self._index_cache.get(device)  # every layer asks, every decode step: one dict lookup
        if idx is None:
            if self.per_example is None:
                raise RoutingError("index() is only defined for per-example routes")
            slot = {n: i for i, n in enumerate(self.names)}
            base_slot = len(self.names)
            idx = self._index_cache[device] = torch.tensor(
                [slot.get(n, base_slot) for n in self.per_example], dtype=torch.long, device=device
            )
        return idx

    def rows_of(self, wanted: Container[str], device: torch.device | str = "cpu") -> list[tuple[str, torch.Tensor | None]]:
        """(adapter, the rows it serves) for each adapter in ``wanted`` this route uses, in route
        order; rows is None when the adapter serves the whole batch."""
        if not self.is_mixed:
            return [(n, None) for n in self.active if n in wanted]
        idx = self.index(torch.device(device))
        return [(n, (idx == i).nonzero().squeeze(1)) for i, n in enumerate(self.names) if n in wanted]


class Router:
    """The route every adapter layer of one model reads.

    ``default`` follows ``set_adapter``; :meth:`use` overrides it for the duration of one forward
    (or one ``generate``). Gradient checkpointing recomputes a forward during backward, outside
    that scope: :meth:`checkpoint_context` restores the route the original forward saw.

    ``scratch`` holds what layers hand each other within one forward (:mod:`peftlab.ops.fuse`);
    it is emptied whenever a :meth:`use` scope ends, so nothing in it outlives a forward.
    """

    def __init__(self) -> None:
        self.default = Route()
        self._stack: list[Route] = []
        self.scratch: dict = {}

    @property
    def route(self) -> Route:
        return self._stack[-1] if self._stack else self.default

    @contextmanager
    def use(self, route: Route) -> Iterator[Route]:
        self._stack.append(route)
        try:
            yield route
        finally:
            self._stack.pop()
            self.scratch.clear()

    def checkpoint_context(self):
        """``context_fn`` for ``torch.utils.checkpoint``: (forward ctx, recompute ctx)."""
        from contextlib import nullcontext

        return nullcontext(), self.use(self.route)
