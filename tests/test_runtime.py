"""peftlab.runtime: the glibc malloc settings a CPU training step runs under."""

import ctypes
import subprocess
import sys

import pytest

from peftlab import runtime


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6").mallopt is not None
    except (OSError, AttributeError):
        return False


_PROBE = """
import ctypes, torch
from peftlab import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
size = 48 << 20

def where_a_block_lives():
    # (bytes in mmapped blocks, heap bytes) while a 48 MiB tensor is alive, then heap bytes after it is freed
    t = torch.ones(size // 4)
    alive = libc.mallinfo2()
    del t
    return alive.hblkhd, alive.arena, libc.mallinfo2().arena

before = where_a_block_lives()
kept = runtime.keep_freed_memory()
after = where_a_block_lives()
print(*before, kept, *after)
"""


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's; elsewhere keep_freed_memory changes nothing")
def test_after_keep_freed_memory_large_blocks_come_from_the_heap_and_stay_there():
    # glibc's default serves a 48 MiB block with its own mmap (above the 32 MiB cap of its mmap
    # threshold) and unmaps it on free, so the next one needs fresh pages. After keep_freed_memory
    # the block comes from the heap, and the heap keeps its size after the free. (Counting page
    # faults instead is not repeatable here: the kernel may reclaim idle pages on its own.) A fresh
    # process: the setting lasts for the process, and this one may already have trained.
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout.split()
    mapped_before, _, _, kept, mapped_after, heap_alive, heap_freed = out
    size = 48 << 20
    assert int(mapped_before) >= size  # default: its own mapping
    assert kept == "True"
    assert int(mapped_after) < size and int(heap_alive) >= size  # kept: from the heap
    assert int(heap_freed) >= size  # and the heap is not trimmed after the free


def test_the_training_loop_applies_it_on_the_cpu_unless_told_not_to(monkeypatch):
    from peftlab.train import TrainArgs, train
    from tests.train.common import collate, counting_rows, lora_llama

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    for keep, expected in ((True, [1]), (False, [])):
        calls.clear()
        train(lora_llama(), counting_rows(8), args=TrainArgs(steps=1, batch_size=4, progress=False, keep_freed_memory=keep),
              collate_fn=collate)
        assert calls == expected
