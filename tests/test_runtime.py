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
import resource, sys, torch
from peftlab import runtime

def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(12 << 20)  # 48 MiB, written: every page touched
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults_of_one_round() for _ in range(3)]
kept = runtime.keep_freed_memory()
faults_of_one_round()  # the heap grows once
print(default[-1], kept, faults_of_one_round())
"""


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's; elsewhere keep_freed_memory changes nothing")
def test_after_keep_freed_memory_a_repeated_large_allocation_maps_no_fresh_pages():
    # A 48 MiB block freed and allocated again: glibc's default serves it with fresh mmap pages every
    # time (its mmap threshold is capped at 32 MiB), each first touch a page fault. Kept in the heap,
    # the next allocation reuses the last one's pages. A fresh process: the setting lasts for the
    # process, and this one may already have trained.
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout.split()
    default, kept, after = int(out[0]), out[1], int(out[2])
    assert default > 5000  # 12288 pages of 4 KiB
    assert kept == "True" and after < 100


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
