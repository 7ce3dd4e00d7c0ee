"""A layer's last stacked copy of its adapters, reused while the adapters are unchanged.

Stacking copies every adapter of a mixed batch into one tensor per factor. A server sends batch
after batch with the same adapters, and a decode step runs each layer once per token: rebuilding
the stack every time would copy the weights every time. :class:`StackCache` keeps the last stack,
its key and the tensors it was built from, and reports a miss when the key differs or any of those
tensors changed: a new version counter (``copy_`` by a load, an optimizer step), new storage
(``.data =``, ``.to()``) or ``requires_grad`` switched on.

Tensors that require grad are never cached: they are being trained, their stack must be part of
the autograd graph, and an optimizer may write them through ``.data``, which bypasses version
counters. Frozen adapters — ``load_adapter(..., is_trainable=False)``, what a server loads — are.

The owner clears the cache when it adds or deletes an adapter: a tensor *replaced* in its
parameter dict (rather than written in place) is not seen by the checks above, which look only at
the tensors the stack was built from — looking the current ones up on every call is what the
cache saves.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch


class StackCache:
    """One cached value, keyed by ``key`` and the state of the tensors it was built from."""

    def __init__(self) -> None:
        self.clear()

    def lookup(self, key: Hashable, token: object = None):
        """The value stored for ``key`` if its source tensors are unchanged, else None. A ``token``
        (the forward's route) seen at the last successful lookup skips the checks: the sources
        are checked once per forward (or ``generate`` call), not once per token."""
        if self._value is None or not (key is self._key or key == self._key):
            return None
        if token is not None and token is self._token:
            return self._value
        for t, (version, ptr) in zip(self._sources, self._stamp):
            if t._version != version or t.data_ptr() != ptr or t.requires_grad:
                return None
        self._token = token
        return self._value

    def store(self, key: Hashable, sources: Sequence[torch.Tensor], value, token: object = None) -> None:
        """Keep ``value`` (built from ``sources``) for ``key`` — unless a source requires grad."""
        if any(t.requires_grad for t in sources):
            self.clear()
            return
        self._key, self._value, self._token = key, value, token
        self._sources = tuple(sources)
        self._stamp = tuple((t._version, t.data_ptr()) for t in sources)

    def clear(self) -> None:
        """Drop the cached value (and the references to its sources)."""
        self._key, self._value, self._token, self._sources, self._stamp = None, None, None, (), ()
