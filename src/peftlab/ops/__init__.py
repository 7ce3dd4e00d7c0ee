"""Kernels behind mixed batches: many adapters in one forward, one adapter per row.

* :mod:`.low_rank` — per-row low-rank updates (LoRA's s·B A x) by gathering, masking or grouping,
  and the single-adapter update as one fused ``addmm``.
* :mod:`.cache` — a layer's stacked adapters, reused while the adapters are unchanged.

Pure tensor functions: no method, model or routing knowledge; layers bring the stacks and slots.
"""

from .cache import StackCache
from .low_rank import add_low_rank, choose_path, low_rank_rows, stack_low_rank

__all__ = ["StackCache", "add_low_rank", "choose_path", "low_rank_rows", "stack_low_rank"]
