"""Shared pieces of the side-by-side benchmarks.

Time: all contenders live in one process and take turns step by step (round-robin, order
rotating each round) after a warm-up, so drift on a noisy machine hits all of them alike; the
report uses medians. Peak RSS is a per-process high-water mark, so it is measured in a fresh
child process per contender.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from typing import Any, Callable


def make_train_step(model, batch: int, seq: int, extra_inputs: dict | None = None,
                    context: Callable[[], Any] | None = None) -> Callable[[], float]:
    """An AdamW step over the model's trainable parameters on fixed random tokens, on the model's
    device; returns seconds (on CUDA, until the step's kernels have finished).

    ``extra_inputs`` go to every forward as they are (per-row inputs a method needs, e.g. the
    (batch,) ``task_ids`` of multitask prompt tuning). ``context``, if given, makes a context
    manager the forward and backward run inside (peftlab's ``model.lean_loss``, as its training
    loop runs them by default).
    """
    import contextlib

    import torch

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, **(extra_inputs or {})}
    data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    # A GPU runs asynchronously: a step is over when its kernels are.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        sync()
        t = time.perf_counter()
        with context() if context is not None else contextlib.nullcontext():
            model(**data).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    return step


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory() -> dict[str, float]:
    """This process's peak RSS and, where CUDA ran, peak GPU memory allocated (MiB)."""
    out = {"peak_rss_mib": peak_rss_mib()}
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        out["peak_gpu_mib"] = sys.modules["torch"].cuda.max_memory_allocated() / 2**20
    return out


def _child(fn: Callable[..., dict], args: tuple, queue) -> None:
    try:
        out = fn(*args)
        out = {**peak_memory(), **out}  # a figure the function took itself (before profiling, say) stands
        queue.put(out)
    except BaseException as exc:  # report, don't hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_isolated(fn: Callable[..., dict], *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise RuntimeError(f"{fn.__name__}{args}: {out['error']}")
    return out


def time_round_robin(steps: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call each contender's step (which returns its own duration) in rotating order."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(steps[name]())
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names),
              file=sys.stderr, flush=True)
    return times


def round_robin(contenders: list[str], rounds: int, measure: Callable[[str], dict]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for c in order:
            out = measure(c)
            results[c].append(out)
            print(f"  round {r + 1}/{rounds} {c:>10}: " + json.dumps({k: round(v, 3) for k, v in out.items() if isinstance(v, (int, float))}),
                  file=sys.stderr, flush=True)
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)
