"""The running batch's KV cache: one ``DynamicCache``, every row right-aligned.

Each layer holds keys and values of shape (B, kv_heads, L, head_dim). Row i's real tokens are the
last ``lengths[i]`` of the L columns; the columns before them are padding, masked out by
:func:`attention_mask`. Right alignment is what lets one decode step append one column to every
row at once, whatever each row's length.

The functions here build a new cache from old ones (a copy). The engine calls them only when rows
join or leave the batch, and to restore a snapshot after a failed step; decode steps grow the cache
in place through the model's own ``past_key_values.update``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""(keys, values) per layer, each (B, kv_heads, L, head_dim)."""


def layers(cache: DynamicCache) -> Layers:
    """The cache's tensors, by reference: a snapshot that later ``update`` calls do not change
    (``DynamicLayer.update`` concatenates into new tensors)."""
    return [(keys, values) for keys, values, *_ in cache]


def from_layers(tensors: Layers) -> DynamicCache:
    return DynamicCache(ddp_cache_data=tensors)


def attention_mask(lengths: Sequence[int], width: int, device: torch.device | str) -> torch.Tensor:
    """(B, width) long: 1 on each row's last ``lengths[i]`` columns, 0 on the padding before them."""
    columns = torch.arange(width, device=device)
    starts = width - torch.tensor(lengths, device=device)
    return (columns[None, :] >= starts[:, None]).long()


def right_align(cache: DynamicCache, mask: torch.Tensor) -> tuple[DynamicCache, list[int]]:
    """The cache of a prefill whose attention ``mask`` (B, L) is not one padding run then one run of
    real tokens per row (virtual tokens: ``[unused][prompt][padding][text]``), reordered so each
    row's real columns are its last ones, in order; and each row's count of them.

    Moving columns is exact: keys are cached after their position was applied, and a decode step's
    query attends to every unmasked column, whatever its place.
    """
    lengths = mask.sum(-1)
    width = int(lengths.max())
    order = torch.argsort(mask.ne(0).long(), dim=-1, stable=True)  # masked columns first, then real ones
    if torch.equal(order, torch.arange(mask.shape[1], device=mask.device).expand_as(order)):
        return cache, lengths.tolist()  # already so (no virtual tokens); some row is all real: width = L
    order = order[:, None, mask.shape[1] - width:, None]  # (B, 1, width, 1)

    def gather(t: torch.Tensor) -> torch.Tensor:
        return t.gather(2, order.expand(-1, t.shape[1], -1, t.shape[3]))

    return from_layers([(gather(k), gather(v)) for k, v in layers(cache)]), lengths.tolist()


def concat(first: DynamicCache, second: DynamicCache) -> DynamicCache:
    """Rows of ``first`` then rows of ``second``, the shorter left-padded to the longer."""
    width = max(first.get_seq_length(), second.get_seq_length())

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, width - t.shape[2], 0))  # (left, right) of head_dim, then of L

    return from_layers([(torch.cat([pad(k1), pad(k2)]), torch.cat([pad(v1), pad(v2)]))
                        for (k1, v1), (k2, v2) in zip(layers(first), layers(second))])


def select(tensors: Layers, rows: Sequence[int], width: int) -> DynamicCache:
    """A cache of ``rows`` only, keeping their last ``width`` columns: padding that no kept row
    needs any more is dropped."""
    index = torch.tensor(rows, device=tensors[0][0].device)
    return from_layers([(k[index, :, k.shape[2] - width:], v[index, :, v.shape[2] - width:]) for k, v in tensors])
