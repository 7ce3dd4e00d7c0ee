"""Which rows form micro-batch k: a pure function of (seed, k), so resuming needs only k.

Epoch e is a permutation of all rows seeded by (seed, e); micro-batch k is slice k mod
``batches_per_epoch`` of epoch ``k // batches_per_epoch``. The rows left over at the end of a
permutation (``n_rows % batch_size``) are skipped in that epoch; the next permutation differs, so
no row is left out for long.

With several processes (:mod:`peftlab.train.distributed`) micro-batch k is still the same
``batch_size`` rows — the global batch — and rank r takes its contiguous share
``batch_size / world_size`` of them, so the ranks together train on what one process would.
"""

from __future__ import annotations

import numpy as np


class Sampler:
    """Deterministic micro-batches of ``batch_size`` row indices out of ``n_rows``; with
    ``world_size`` > 1, rank ``rank``'s share of each."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        if n_rows < batch_size:
            raise ValueError(f"there are {n_rows} training rows but batch_size={batch_size}; "
                             f"lower batch_size to at most {n_rows} or add rows")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is the global micro-batch, split evenly over {world_size} "
                             f"processes; make it a multiple of {world_size} (e.g. "
                             f"{batch_size + world_size - batch_size % world_size}) or change the number of processes")
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.per_rank, self.rank = batch_size // world_size, rank
        self.batches_per_epoch = n_rows // batch_size
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)  # one epoch's permutation, cached

    def indices(self, micro_batch: int) -> list[int]:
        """Row indices of micro-batch ``micro_batch`` (0-based, counted over the whole run) that this rank takes."""
        epoch, k = divmod(micro_batch, self.batches_per_epoch)
        if epoch != self._epoch:
            # SeedSequence mixes the pair properly: (seed, epoch) and (seed + 1, epoch - 1) differ.
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        start = k * self.batch_size + self.rank * self.per_rank
        return self._order[start:start + self.per_rank].tolist()
