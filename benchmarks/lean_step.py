"""The lean LoRA train step (issue 7): peftlab vs Hugging Face PEFT vs full fine-tuning, each trick on/off.

All-linear LoRA r=8, α=16 on SmolLM2-135M-Instruct in fp32, batch 8×128, AdamW, 2 threads; the same
random tokens as ``lora_step.py`` for every contender.

1. Step time and peak RSS. Every measurement is a fresh child process (load, build, one warm-up
   step, timed steps; the child's own ``ru_maxrss``), contenders taking turns round-robin; medians.
   Contenders: full fine-tuning, PEFT, peftlab as it trains by default (lean loss and fused
   shared-input LoRA on), peftlab with one trick flipped at a time (lean loss off, fusion off,
   gradient checkpointing on, ``torch.compile`` on with ``--compile``, after a probe that inductor
   works here, glibc's malloc left alone: "-keep-freed", base GEMM and adapter as separate autograd
   nodes: "-fuse-base"), and peftlab on an NF4 base. "floor" is the frozen-base step with no
   adapter on the linear layers (one on the input embedding, so backward runs through every
   layer): the 4N the issue's FLOP limit counts, measured; peftlab minus floor is what the
   adapters cost. On the CPU,
   peftlab runs with ``peftlab.runtime.keep_freed_memory()`` as ``peftlab.train`` does; "peft
   +keep-freed" and "full-ft +keep-freed" give the others the same malloc setting. A trick this
   checkout does not have yet is reported and left out; a contender that fails is reported and
   the exit status is 1.
2. Loss curves on real text (Debian's ``fortunes`` quotes as causal-LM text rows), LoRA trained by
   ``peftlab.train.train`` on an fp32 base and on an NF4 base, same seed and data; a second fp32 run
   with another LoRA initialisation gives the seed-to-seed spread. "Within noise" is claimed only
   when the NF4–fp32 gap over the last steps is below both the step-to-step noise and that spread.

``--labels completion`` labels only the last half of each row (SFT-like), where "no logits at
positions without labels" pays; the issue's anchor labels every position (``--labels all``).

On a GPU (``--device cuda --dtype bf16``) the table adds tokens/s and peak GPU memory
(``torch.cuda.max_memory_allocated``), and the memory bar uses that. NF4 there is bitsandbytes'
``Linear4bit`` (what ``quantize_model`` picks on CUDA), with peftlab's own NF4 beside it
("peftlab nf4 torch") and PEFT's QLoRA on the same bitsandbytes layers ("peft nf4"). ``--config``
builds the model from a config with random weights, for a machine without the checkpoint (the
timings and memory do not depend on the weights' values; loss curves do, so it skips them).

    python benchmarks/lean_step.py [--rounds 3] [--labels all|completion] [--compile] [--json out/lean.json]
    python benchmarks/lean_step.py --device cuda --dtype bf16 --config benchmarks/configs/smollm2-135m-instruct.json
    python benchmarks/lean_step.py --quick --threads 1      # tiny random Llama: checks the script (minutes: a process each)

``--profile N`` profiles one more step of each contender's first run and prints its N costliest
ops (on a GPU, and the kernel launches per step). ``--in-process`` (GPU only) measures every
contender in the parent process, peak GPU memory from a reset counter: no process start per
measurement, so more rounds fit a GPU lease.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import make_train_step, median, peak_memory, round_robin, run_isolated  # noqa: E402

MODEL = "smollm2-135m-instruct"
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear")  # the same for peftlab and PEFT

# peftlab's default training configuration; each trick row flips one of these.
DEFAULT = {"lean_loss": True, "chunk_size": None, "fuse": True, "checkpointing": False, "compile": False,
           "quantize": None, "backend": "auto", "keep_freed": True, "targets": None, "fuse_base": True,
           "adapter_autocast": True}
# Contender -> (library, changes to DEFAULT for peftlab).
CONTENDERS: dict[str, tuple[str, dict]] = {
    "full-ft": ("full", {}),
    # The frozen-base floor: peftlab with one adapter on the input embedding and none on the linear
    # layers, so the step is the base's forward, the input-gradient backward through every layer and
    # the lean loss: the 4N the FLOP limit counts, measured. peftlab minus this is what the
    # 210 all-linear adapters cost.
    "floor": ("peftlab", {"targets": ["embed_tokens"]}),
    "peft": ("peft", {}),
    "peftlab": ("peftlab", {}),
    "peftlab -lean-loss": ("peftlab", {"lean_loss": False}),
    "peftlab chunk 1024": ("peftlab", {"chunk_size": 1024}),
    "peftlab chunk 4096": ("peftlab", {"chunk_size": 4096}),
    "peftlab -keep-freed": ("peftlab", {"keep_freed": False}),
    "peft +keep-freed": ("peft", {"keep_freed": True}),
    "full-ft +keep-freed": ("full", {"keep_freed": True}),
    "peftlab -fuse": ("peftlab", {"fuse": False}),
    # base GEMM and adapter as separate autograd nodes (ops.LoraLinear off)
    "peftlab -fuse-base": ("peftlab", {"fuse_base": False}),
    "peftlab +checkpointing": ("peftlab", {"checkpointing": True}),
    "peftlab +compile": ("peftlab", {"compile": True}),
    "peftlab nf4": ("peftlab", {"quantize": "nf4"}),
    "peftlab nf4 torch": ("peftlab", {"quantize": "nf4", "backend": "torch"}),
    "peft nf4": ("peft", {"quantize": "nf4", "backend": "bitsandbytes"}),
    # PEFT keeps adapter weights in fp32 on a half-precision base (autocast_adapter_dtype=True) and
    # casts each adapted layer's input to fp32; peftlab creates them in the base's dtype. This row
    # gives PEFT bf16 adapters too (autocast_adapter_dtype=False): like for like on a bf16 GPU run.
    "peft base-dtype": ("peft", {"adapter_autocast": False}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BARS = [("peftlab / full-ft step", "peftlab", "full-ft", "step_s", 0.70),
        ("peftlab / peft step", "peftlab", "peft", "step_s", 0.90),
        ("peftlab / peft peak RSS", "peftlab", "peft", "peak_rss_mib", 0.80),
        # Like for like: PEFT under the same malloc setting (printed when that contender ran).
        ("peftlab / (peft +keep-freed) step", "peftlab", "peft +keep-freed", "step_s", 0.90),
        ("peftlab / (peft +keep-freed) peak RSS", "peftlab", "peft +keep-freed", "peak_rss_mib", 0.80)]


def missing_tricks() -> dict[str, str]:
    """Trick -> why this checkout cannot switch it; the benchmark leaves those rows out."""
    from peftlab import PeftModel, ops

    missing = {}
    if not hasattr(PeftModel, "lean_loss"):
        missing["lean_loss"] = "PeftModel.lean_loss() is missing (the lean-loss work is not in this checkout)"
    if not hasattr(ops, "configure"):
        missing["fuse"] = "peftlab.ops.configure(fuse_shared_input=...) is missing (fused LoRA not in this checkout)"
    if "fuse_with_base" not in getattr(ops, "options", dict)():
        missing["fuse_base"] = "peftlab.ops.configure(fuse_with_base=...) is missing (LoraLinear not in this checkout)"
    return missing


def base_model(setup: dict, quantize: str | None, backend: str = "auto"):
    """SmolLM2 (with --config: its architecture, random weights; with --quick: a tiny random Llama
    with SmolLM2's vocabulary) on the run's device and dtype, dense or quantised."""
    from peftlab.models import load, tiny
    from peftlab.quant import quantize_model

    device, dtype = torch.device(setup["device"]), DTYPES[setup["dtype"]]
    if setup["model"] == "tiny":
        model = tiny("llama", vocab_size=setup["vocab_size"])
    elif setup["config"]:
        import transformers

        config = transformers.AutoConfig.from_pretrained(setup["config"])
        with device:  # initialised where it runs: a billion random weights take long on a CPU
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif device.type == "cpu" and backend != "bitsandbytes":
        return load(setup["model"], dtype=dtype, quantize=quantize)[0]  # quantised as it is read
    else:
        model = load(setup["model"], dtype=dtype)[0]
    model = model.to(device=device, dtype=dtype)
    return quantize_model(model, quantize, backend=backend) if quantize else model


class _Forward(torch.nn.Module):
    """What the shared train step calls: the model under test, with the labels mode and lean-loss switch.

    ``completion`` labels: the first half of every row is prompt (label -100), the second half is
    learned, so a lean loss has half the positions to push through the output head.
    """

    def __init__(self, model, call, labels: str, lean: bool | None, chunk_size: int | None = None) -> None:
        super().__init__()
        self.model, self.config, self.labels, self.lean = model, model.config, labels, lean
        self.chunk = {} if chunk_size is None else {"chunk_size": chunk_size}  # None: the library's default
        self.call = call  # the model itself or its torch.compile'd wrapper

    def forward(self, **data):
        if self.labels == "completion":
            data["labels"] = data["labels"].clone()
            data["labels"][:, : data["labels"].shape[1] // 2] = -100
        switch = (self.model.lean_loss(enabled=self.lean, **self.chunk) if self.lean is not None
                  else contextlib.nullcontext())
        with switch:
            return self.call(**data)


def measure(name: str, setup: dict) -> dict:
    """One contender in this (fresh) process: warm-up and median step time; the parent adds peak RSS."""
    import time

    torch.set_num_threads(setup["threads"])
    torch.manual_seed(0)
    lib, changes = CONTENDERS[name]
    cfg = {**DEFAULT, **changes}
    # glibc malloc keeping freed memory: peftlab.train's default on the CPU; the others only when named.
    if setup["device"] == "cpu" and changes.get("keep_freed", lib == "peftlab"):
        from peftlab import runtime

        runtime.keep_freed_memory()
    model = base_model(setup, cfg["quantize"], cfg["backend"])
    lean = None
    if lib == "peft":
        import peft

        model.is_loaded_in_4bit = cfg["backend"] == "bitsandbytes"  # how PEFT finds bitsandbytes layers
        model = peft.get_peft_model(model, peft.LoraConfig(**LORA), autocast_adapter_dtype=cfg["adapter_autocast"])
    elif lib == "peftlab":
        from peftlab import LoraConfig, get_peft_model, ops

        if hasattr(ops, "configure"):
            ops.configure(fuse_shared_input=cfg["fuse"])
        if "fuse_with_base" in getattr(ops, "options", dict)():
            ops.configure(fuse_with_base=cfg["fuse_base"])
        targets = {} if cfg["targets"] is None else {"target_modules": cfg["targets"]}
        model = get_peft_model(model, LoraConfig(**{**LORA, **targets}))
        if cfg["checkpointing"]:
            model.activation_checkpointing_enable()
        lean = cfg["lean_loss"] if hasattr(model, "lean_loss") else None
    call = torch.compile(model) if cfg["compile"] else model
    step = make_train_step(_Forward(model, call, setup["labels"], lean, cfg["chunk_size"]), setup["batch"],
                           setup["seq"])
    start = time.perf_counter()
    for _ in range(setup["warmup"]):
        step()  # warm-up: allocator, optimizer state, compilation (kernel autotuning on a GPU)
    warmup = time.perf_counter() - start
    out = {"step_s": statistics.median(step() for _ in range(setup["steps"])), "warmup_s": warmup,
           "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}
    if setup.get("profile"):
        out.update(peak_memory())  # the step's own peak, before the profiler's
        out["profile"] = profile_step(step, setup["device"], setup["profile"])
    return out


def measure_here(name: str, setup: dict) -> dict:
    """:func:`measure` in this process (``--in-process``, GPU only): peak GPU memory from a reset of
    CUDA's peak counter, the model freed before the next contender. Saves a process start per
    measurement (about 12 s on a GPU machine) at the price of shared process state: everything
    ``measure`` configures (``ops.configure``) it sets for every peftlab contender."""
    import gc

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        out = measure(name, setup)
    except Exception as exc:  # as run_isolated reports a child's failure
        raise RuntimeError(f"measure({name!r}): {type(exc).__name__}: {exc}") from exc
    out.setdefault("peak_gpu_mib", torch.cuda.max_memory_allocated() / 2**20)  # unless measured before profiling
    out["peak_rss_mib"] = float("nan")  # a process-wide high-water mark: meaningless per contender here
    gc.collect()
    torch.cuda.empty_cache()
    return out


def profile_step(step, device: str, rows: int) -> str:
    """One more step under ``torch.profiler``: the ``rows`` ops with the most self time on the device
    (the CPU's own time on a CPU), and how many kernels a step launched."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=rows, max_name_column_width=60)
    if gpu:
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        device_ms = sum(e.self_device_time_total for e in events) / 1e3
        table += f"\nkernel launches in the step: {launches}; device busy {device_ms:.1f} ms\n"
    return table


def compile_probe(threads: int, device: str) -> dict:
    """A tiny Llama with LoRA, compiled, one forward and backward: does inductor work here?"""
    from peftlab import LoraConfig, get_peft_model
    from peftlab.models import tiny

    torch.set_num_threads(threads)
    model = torch.compile(get_peft_model(tiny("llama").to(device), LoraConfig(**LORA)))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    return {}


def loss_curve(setup: dict, quantize: str | None, init_seed: int) -> dict:
    """Train LoRA on fortunes text with ``peftlab.train.train``; per-step losses. Data order: seed 0."""
    from _fortunes import load_fortunes
    from peftlab import LoraConfig, get_peft_model
    from peftlab.data import collate, encode_records
    from peftlab.models import load_tokenizer
    from peftlab.train import TrainArgs, train

    torch.set_num_threads(setup["threads"])
    tokenizer = load_tokenizer(MODEL)
    train_rows, _, _ = load_fortunes()
    rows = encode_records([{"text": r["text"]} for r in train_rows], tokenizer, kind="text",
                          max_length=setup["curve_length"]).rows
    torch.manual_seed(init_seed)  # LoRA's A initialisation
    model = get_peft_model(base_model(setup, quantize), LoraConfig(**LORA))
    args = TrainArgs(steps=setup["curve_steps"], batch_size=setup["curve_batch"], lr=1e-3, seed=0, progress=False)
    result = train(model, rows, args=args, collate_fn=lambda b: collate(b, tokenizer.pad_token_id))
    return {"losses": result.losses}


def compare_curves(fp32: list[float], nf4: list[float], other_seed: list[float], last: int) -> dict:
    """The NF4–fp32 gap over the last steps against two yardsticks of noise.

    step noise: the standard deviation of fp32's step-to-step changes over those steps (batches
    differ, so the loss jitters); seed spread: the mean |fp32 − fp32 with another LoRA init|.
    """
    gap = statistics.fmean(abs(a - b) for a, b in zip(fp32[-last:], nf4[-last:]))
    changes = [b - a for a, b in zip(fp32[-last - 1:], fp32[-last:])]
    step_noise = statistics.stdev(changes) if len(changes) > 1 else float("nan")
    seed_spread = statistics.fmean(abs(a - b) for a, b in zip(fp32[-last:], other_seed[-last:]))
    return {"last_steps": last, "mean_abs_gap": gap, "step_noise": step_noise, "seed_spread": seed_spread,
            "within_noise": gap <= step_noise and gap <= seed_spread}


def write_json(report: dict, path: str) -> None:
    if path == "-":
        print(json.dumps(report, indent=1))
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, batch 2x32, 1 round: checks the script")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per child process")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the model's dtype (bf16: on a GPU)")
    ap.add_argument("--config", metavar="PATH", help="build the model from this config.json with random weights "
                    "(a machine without the checkpoint; no loss curves)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per child process before the timed ones")
    ap.add_argument("--labels", choices=("all", "completion"), default="all",
                    help="all positions labelled (the issue's anchor) or only each row's second half (SFT-like)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of: " + ", ".join(CONTENDERS))
    ap.add_argument("--compile", action="store_true",
                    help="include 'peftlab +compile' (off by default: compiling takes minutes in every child process)")
    ap.add_argument("--curve-steps", type=int, default=40, help="loss-curve steps (0: no loss curves)")
    ap.add_argument("--json", metavar="PATH", help="also write every number as JSON ('-': stdout)")
    ap.add_argument("--in-process", action="store_true",
                    help="GPU only: measure every contender in this process (peak GPU memory per contender from a "
                         "reset counter; no peak RSS), instead of a fresh child process each")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="after the timed steps, profile one more step and print its ROWS costliest ops (first round)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.steps, a.batch, a.seq = 1, 1, 2, 32
        a.curve_steps = min(a.curve_steps, 6)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if a.in_process and not a.device.startswith("cuda"):
        ap.error("--in-process measures peak GPU memory per contender; on the CPU each needs its own process (peak RSS)")
    if a.config and a.curve_steps:
        print("--config: random weights, so no loss curves (--curve-steps 0)", flush=True)
        a.curve_steps = 0
    setup = {"model": "tiny" if a.quick else MODEL, "vocab_size": 49152, "threads": a.threads, "steps": a.steps,
             "warmup": a.warmup, "batch": a.batch, "seq": a.seq, "labels": a.labels, "curve_steps": a.curve_steps,
             "curve_batch": 2 if a.quick else 8, "curve_length": 32 if a.quick else 128, "device": a.device,
             "dtype": a.dtype, "config": a.config, "profile": a.profile, "in_process": a.in_process}
    if a.quick:
        print("--quick: a tiny random Llama; its timings check the script, not the library", flush=True)
    contenders = [c for c in a.contenders.split(",") if c]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        ap.error(f"unknown contender(s) {unknown}; choose from {list(CONTENDERS)}")
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{a.threads} threads"
    print(f"lean LoRA step: {setup['model']}{' (random weights from ' + a.config + ')' if a.config else ''} "
          f"{a.dtype} on {a.device} ({where}), all-linear r=8, batch {a.batch}x{a.seq}, {a.labels} positions "
          f"labelled, AdamW; {a.rounds} rounds x {a.steps} timed steps after {a.warmup} warm-up (medians)", flush=True)

    left_out = {}
    for trick, why in missing_tricks().items():
        for c, (_, changes) in CONTENDERS.items():
            if trick in changes:
                left_out[c] = why
        print(f"note: {why}; peftlab runs without it and its on/off row is left out", flush=True)
    if "peftlab +compile" in contenders and not a.compile:
        left_out["peftlab +compile"] = ("off by default: compiling takes minutes in every child process and made "
                                        "a tiny Llama's step slower; pass --compile to measure it")
    elif "peftlab +compile" in contenders:
        try:
            run_isolated(compile_probe, a.threads, a.device)
        except RuntimeError as err:
            left_out["peftlab +compile"] = f"torch.compile fails on this machine: {err}"
    for c, why in left_out.items():
        if c in contenders:
            contenders.remove(c)
            print(f"left out {c!r}: {why}", flush=True)

    # 1. Step time and peak RSS, each measurement in a fresh child process. A contender that fails
    #    is reported (and the exit status is 1) without losing the others' measurements.
    failed: dict[str, str] = {}

    profiled: set[str] = set()  # --profile: each contender's first run only

    def attempt(c: str) -> dict:
        if c not in failed:
            try:
                run_setup = {**setup, "profile": 0 if c in profiled else setup["profile"]}
                profiled.add(c)
                if a.in_process:
                    return measure_here(c, run_setup)
                return run_isolated(measure, c, run_setup)
            except RuntimeError as err:
                failed[c] = str(err)
        return {"failed": 1}

    res = round_robin(contenders, a.rounds, attempt)
    for c in contenders:
        table = res[c][0].pop("profile", None) if res[c] else None
        if table:
            print(f"\nprofile of one {c} step:\n{table}", flush=True)
    gpu = a.device.startswith("cuda")
    mem = "peak_gpu_mib" if gpu else "peak_rss_mib"  # the memory the bars compare
    rows = {c: {"step_s": median(res[c], "step_s"), "peak_rss_mib": median(res[c], "peak_rss_mib"),
                "warmup_s": median(res[c], "warmup_s"), "trainable_m": res[c][0]["trainable_m"], "runs": res[c]}
            for c in contenders if c not in failed}
    for c, r in rows.items():
        r["tokens_per_s"] = a.batch * a.seq / r["step_s"]
        if gpu:
            r["peak_gpu_mib"] = median(res[c], "peak_gpu_mib")
    report = {"setup": setup, "left_out": left_out, "failed": failed, "contenders": rows, "bars": [], "curves": None}

    def ratio(a_: str, b_: str, key: str) -> str:
        return f"{rows[a_][key] / rows[b_][key]:.2f}x" if a_ in rows and b_ in rows else "—"

    mem_name = "peak GPU memory" if gpu else "peak RSS"
    print(f"\n1. step time and {mem_name} ({a.rounds} rounds{' in this process' if a.in_process else ' of child processes'}, {a.steps} timed steps each; medians)")
    print(f"| contender | trainable (M) | step ({'ms' if gpu else 's'}) | tokens/s | vs full FT | vs peft | vs peftlab "
          f"| {mem_name} (MiB) | vs peft | vs peftlab | warm-up (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c, r in rows.items():
        step = f"{r['step_s'] * 1e3:.1f}" if gpu else f"{r['step_s']:.2f}"
        print(f"| {c} | {r['trainable_m']:.2f} | {step} | {r['tokens_per_s']:.0f} | {ratio(c, 'full-ft', 'step_s')} "
              f"| {ratio(c, 'peft', 'step_s')} | {ratio(c, 'peftlab', 'step_s')} | {r[mem]:.0f} "
              f"| {ratio(c, 'peft', mem)} | {ratio(c, 'peftlab', mem)} | {r['warmup_s']:.1f} |")
    print()
    for label, num, den, key, bar in BARS:
        if key == "peak_rss_mib":
            label, key = label.replace("peak RSS", mem_name), mem
        if num in rows and den in rows:
            value = rows[num][key] / rows[den][key]
            report["bars"].append({"bar": label, "value": value, "limit": bar, "met": value <= bar})
            print(f"bar {label} <= {bar:.2f}: {value:.3f}x — {'met' if value <= bar else 'NOT met'}")

    # 2. Loss curves: fp32 vs NF4 base (and a second fp32 LoRA init for the seed-to-seed spread).
    if a.curve_steps:
        curves = {run: run_isolated(loss_curve, setup, quantize, seed)["losses"]
                  for run, quantize, seed in (("fp32", None, 0), ("nf4", "nf4", 0), ("fp32 seed 1", None, 1))}
        last = min(10, max(2, a.curve_steps // 2))
        verdict = compare_curves(curves["fp32"], curves["nf4"], curves["fp32 seed 1"], last)
        report["curves"] = {"losses": curves, **verdict}
        print(f"\n2. LoRA on fortunes text, {a.curve_steps} steps x batch {setup['curve_batch']} "
              f"(max {setup['curve_length']} tokens), lr 1e-3, data seed 0")
        print("| step | " + " | ".join(curves) + " |\n|---|" + "---|" * len(curves))
        for i in range(a.curve_steps):
            print(f"| {i + 1} | " + " | ".join(f"{v[i]:.4f}" for v in curves.values()) + " |")
        print(f"\nlast {last} steps: mean |nf4 - fp32| = {verdict['mean_abs_gap']:.4f}; step-to-step noise "
              f"(std of fp32's changes) = {verdict['step_noise']:.4f}; seed-to-seed spread (mean |fp32 - fp32 "
              f"seed 1|) = {verdict['seed_spread']:.4f} -> "
              + ("within noise" if verdict["within_noise"] else "NOT within noise"))
    if a.json:
        write_json(report, a.json)
    for c, why in failed.items():
        print(f"\nFAILED {c}: {why}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
