"""Peak memory of loading SmolLM2-135M quantised: straight from the files vs load whole, then quantise.

Each contender runs in a fresh child process (peak RSS is per process, see ``_common.py``) that
imports peftlab, notes its resident memory, loads the model and reports its peak RSS (VmHWM) and
its resident memory after loading, both above that baseline:

* ``fp32`` — ``load("smollm2-135m-instruct")``, for scale;
* ``<scheme> streamed`` — ``load(..., quantize=scheme)``: the local safetensors checkpoint read
  tensor by tensor into the quantised model (``peftlab.models.quantized``);
* ``<scheme> whole, then quantised`` — the same call with streaming switched off:
  ``from_pretrained`` and then ``quantize_model``, what every other source takes.

    python benchmarks/quant_load.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import median, round_robin, run_isolated  # noqa: E402

MODEL = "smollm2-135m-instruct"


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) / 1024


def measure(contender: str) -> dict:
    import torch

    import peftlab.models.loaders as loaders
    from peftlab.models import load

    torch.set_num_threads(1)
    scheme, _, road = contender.partition(" ")
    if road.startswith("whole"):
        loaders.stream_quantized = lambda *args, **kwargs: None
    baseline = _status_mib("VmRSS")
    started = time.perf_counter()
    model, _ = load(MODEL, quantize=None if scheme == "fp32" else scheme)
    seconds = time.perf_counter() - started
    return {"peak_above_baseline_mib": _status_mib("VmHWM") - baseline,
            "resident_after_mib": _status_mib("VmRSS") - baseline, "load_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--schemes", default="nf4,int8")
    a = ap.parse_args()
    contenders = ["fp32"] + [f"{s} {road}" for s in a.schemes.split(",") if s
                             for road in ("streamed", "whole, then quantised")]
    res = round_robin(contenders, a.rounds, lambda c: run_isolated(measure, c))
    print(f"\nloading {MODEL}: child processes, {a.rounds} rounds, medians; MiB above the process's "
          "resident memory after importing peftlab\n")
    print("| load | peak RSS (MiB) | resident after (MiB) | time (s) |\n|---|---|---|---|")
    for c in contenders:
        print(f"| {c} | {median(res[c], 'peak_above_baseline_mib'):.0f} | {median(res[c], 'resident_after_mib'):.0f} "
              f"| {median(res[c], 'load_s'):.1f} |")


if __name__ == "__main__":
    main()
