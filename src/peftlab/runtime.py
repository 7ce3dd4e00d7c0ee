"""The C heap under a CPU training step (glibc's malloc).

A training step allocates and frees the same large buffers every step: activations of
(batch, seq, d_ff), logits chunks, gradients. glibc serves blocks above its mmap threshold
(dynamic, at most 32 MiB) with fresh ``mmap`` pages and gives freed heap tops back to the OS, so
every step touches new pages again, and each first touch is a page fault. Measured on this
project's machine (SmolLM2-135M, LoHa r=8 all-linear, 8×128, 2 threads): 70k–190k page faults per
step and 7.6–9.1 s per step by default; with :func:`keep_freed_memory`, 0 faults per step and
6.8–6.9 s in the same in-process check, at 2912 instead of 2856 MiB peak RSS. Across the
benchmark's child processes some faults remain (300–58k per step: the kernel may also reclaim
idle pages on its own), and the step gain was 3 % for LoRA, about 10 % for LoHa (BENCHMARKS.md).

``peftlab.train`` calls :func:`keep_freed_memory` when it trains on the CPU
(``TrainArgs(keep_freed_memory=False)`` or ``--no-keep-freed-memory`` to leave malloc alone). It is
a setting of the whole process, as ``LD_PRELOAD``-ing jemalloc or tcmalloc would be (what PyTorch's
CPU tuning guide suggests for the same reason). :func:`release_freed_memory` is its opposite, for
one-off peaks such as loading a model.
"""

from __future__ import annotations

import ctypes
import functools

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large blocks from its heap and keep freed memory for reuse.

    Sets the mmap threshold to 1 GiB (blocks below it come from the heap, not fresh mappings), the
    trim threshold to 2 GiB and the top pad to 256 MiB (the heap grows in large steps and is not
    shrunk after every step). Returns False where the C library is not glibc (nothing changes).
    Idempotent; lasts for the process.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1) & (libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1) \
        & (libc.mallopt(_M_TOP_PAD, 256 << 20) == 1)
    return bool(ok)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``) — quantising a layer
    leaves a few weight-sized temporaries behind in the heap; elsewhere, nothing to do."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
