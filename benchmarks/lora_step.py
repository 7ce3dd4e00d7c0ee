"""LoRA train step on SmolLM2-135M: peftlab vs Hugging Face PEFT vs full fine-tuning.

All-linear LoRA r=8, batch 8×128 tokens, fp32, 2 threads, AdamW, the same random tokens for all.

1. Each contender alone: a fresh child process per measurement (load, build, one warm-up step,
   timed steps; peak RSS), contenders taking turns round-robin; medians.
2. PEFT vs peftlab like for like: both adapter models in one process, alternating step by step
   after a warm-up; medians. (Full fine-tuning is left out here: its 0.5 GB of gradients and
   optimizer traffic per step slow whatever shares the process.)

    python benchmarks/lora_step.py [--rounds 3] [--ab-rounds 6]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import make_train_step, median, round_robin, run_isolated, time_round_robin  # noqa: E402

CONTENDERS = ["full-ft", "peft", "peftlab"]


def build(contender: str, base):
    if contender == "peftlab":
        from peftlab import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if contender == "peft":
        import peft

        return peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return base


def alone(contender: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    """One contender in a fresh process: median step time; the parent adds peak RSS."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from peftlab.models import load

    model = build(contender, load("smollm2-135m-instruct")[0])
    step = make_train_step(model, batch, seq)
    step()  # warm-up: allocator, optimizer state
    return {"step_s": statistics.median(step() for _ in range(steps)),
            "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ab-rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(f"LoRA all-linear r=8 train step, SmolLM2-135M fp32, batch {a.batch}x{a.seq}, {a.threads} threads", flush=True)

    # 1. Alone, in child processes (run first, while this process is small: a child's peak RSS
    #    starts from its parent's size at fork).
    res = round_robin(CONTENDERS, a.rounds, lambda c: run_isolated(alone, c, a.steps, a.batch, a.seq, a.threads))
    step = {c: median(res[c], "step_s") for c in CONTENDERS}
    rss = {c: median(res[c], "peak_rss_mib") for c in CONTENDERS}
    print(f"\n1. each contender alone ({a.rounds} rounds of child processes, {a.steps} timed steps each; medians)")
    print("| contender | trainable (M) | step (s) | vs full FT | vs peft | peak RSS (MiB) | RSS vs peft |")
    print("|---|---|---|---|---|---|---|")
    for c in CONTENDERS:
        print(f"| {c} | {res[c][0]['trainable_m']:.2f} | {step[c]:.2f} | {step[c] / step['full-ft']:.2f}x "
              f"| {step[c] / step['peft']:.2f}x | {rss[c]:.0f} | {rss[c] / rss['peft']:.2f}x |")

    # 2. Like for like, alternating in one process.
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from peftlab.models import load

    base, _ = load("smollm2-135m-instruct")
    steps = {c: make_train_step(build(c, copy.deepcopy(base)), a.batch, a.seq) for c in ("peft", "peftlab")}
    ab = {c: statistics.median(v) for c, v in time_round_robin(steps, a.ab_rounds).items()}
    print(f"\n2. peft and peftlab alternating in one process ({a.ab_rounds} rounds after a warm-up; medians)")
    print(f"| peft step (s) | peftlab step (s) | peftlab / peft |\n|---|---|---|\n"
          f"| {ab['peft']:.2f} | {ab['peftlab']:.2f} | {ab['peftlab'] / ab['peft']:.3f}x |")
    print(f"\nbar (peftlab <= peft): alone {step['peftlab'] / step['peft']:.3f}x, "
          f"alternating {ab['peftlab'] / ab['peft']:.3f}x")


if __name__ == "__main__":
    main()
