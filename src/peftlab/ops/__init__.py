"""Kernels behind mixed batches: many adapters in one forward, one adapter per row.

* :mod:`.low_rank` — per-row low-rank updates (LoRA's s·B A x) by gathering, masking or grouping,
  the single-adapter update as one fused ``addmm``, and :class:`LoraLinear` (base GEMM and adapter
  as one autograd node, for training).
* :mod:`.cache` — a layer's stacked adapters, reused while the adapters are unchanged.
* :mod:`.fuse` — sibling layers reading one input share its down-projection; the runtime
  options (``configure(fuse_shared_input=..., fuse_with_base=...)``, ``options()``).

Pure tensor functions: no method, model or routing knowledge; layers bring the stacks and slots.
"""

from .cache import StackCache
from .fuse import SiblingGroup, configure, fusing, fusing_with_base, options
from .low_rank import (FusedDown, LoraLinear, add_low_rank, add_up, choose_path, low_rank_rows, shared_down, stack_low_rank,
                       up_rows)
from .loss import causal_lm_loss

__all__ = ["StackCache", "causal_lm_loss", "add_low_rank", "choose_path", "low_rank_rows", "stack_low_rank",
           "FusedDown", "LoraLinear", "SiblingGroup", "add_up", "configure", "fusing", "fusing_with_base", "options",
           "shared_down", "up_rows"]
