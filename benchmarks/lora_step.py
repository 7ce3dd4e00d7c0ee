"""LoRA train step on SmolLM2-135M: peftlab vs Hugging Face PEFT vs full fine-tuning.

All-linear LoRA r=8, batch 8×128 tokens, fp32, 2 threads, AdamW. Each measurement is a fresh
child process (load, 1 warm-up step, timed steps); contenders alternate round-robin.

    python benchmarks/lora_step.py [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import median, round_robin, run_isolated  # noqa: E402

CONTENDERS = ["full-ft", "peft", "peftlab"]


def measure(contender: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from peftlab.models import load

    model, _ = load("smollm2-135m-instruct")
    if contender == "peftlab":
        from peftlab import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    elif contender == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> float:
        t = time.perf_counter()
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step()  # warm-up: allocator, optimizer state
    times = [step() for _ in range(steps)]
    return {"step_s": statistics.median(times), "trainable_m": sum(p.numel() for p in params) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(f"LoRA all-linear r=8 train step, SmolLM2-135M fp32, batch {a.batch}x{a.seq}, {a.threads} threads, "
          f"{a.rounds} rounds x {a.steps} timed steps (medians)", flush=True)
    res = round_robin(CONTENDERS, a.rounds, lambda c: run_isolated(measure, c, a.steps, a.batch, a.seq, a.threads))
    step = {c: median(res[c], "step_s") for c in CONTENDERS}
    rss = {c: median(res[c], "peak_rss_mib") for c in CONTENDERS}
    print(f"\n| contender | trainable (M) | step (s) | vs full FT | vs peft | peak RSS (MiB) | RSS vs peft |")
    print("|---|---|---|---|---|---|---|")
    for c in CONTENDERS:
        print(f"| {c} | {res[c][0]['trainable_m']:.2f} | {step[c]:.2f} | {step[c] / step['full-ft']:.2f}x "
              f"| {step[c] / step['peft']:.2f}x | {rss[c]:.0f} | {rss[c] / rss['peft']:.2f}x |")
    verdict = "meets" if step["peftlab"] <= step["peft"] * 1.0 else "misses"
    print(f"\npeftlab step = {step['peftlab'] / step['peft']:.3f}x peft's ({verdict} the bar: <= 1.0x)")


if __name__ == "__main__":
    main()
