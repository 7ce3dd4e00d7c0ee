"""Train step per method on SmolLM2-135M: peftlab vs Hugging Face PEFT vs full fine-tuning.

Each measurement is a fresh child process (peak RSS is per process): load, build the method,
one warm-up step, timed steps. Contenders alternate round-robin; medians are reported. peftlab's
steps run as ``peftlab.train`` runs them by default: inside ``model.lean_loss()`` (``--no-lean-loss``:
the model's ordinary forward and loss, as PEFT's), with glibc's malloc keeping freed memory
(``peftlab.runtime.keep_freed_memory``; ``--no-keep-freed-memory`` turns it off).
``--keep-freed-memory-all`` gives PEFT and full fine-tuning the same malloc setting, for a
like-for-like comparison of the libraries' own work. Page faults per step are reported beside.

    python benchmarks/methods_step.py [--methods lora,loha,...] [--rounds 2] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import make_train_step, median, round_robin, run_isolated  # noqa: E402

# (peftlab config kwargs, peft config class name, peft kwargs); None: PEFT has no such method.
METHODS = {
    "lora": (dict(r=8, lora_alpha=16, target_modules="all-linear"), "LoraConfig",
             dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "loha": (dict(r=8, alpha=16, target_modules="all-linear"), "LoHaConfig",
             dict(r=8, alpha=16, target_modules="all-linear")),
    "ia3": (dict(), "IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "bottleneck": (dict(variant="houlsby", bottleneck=64), None, None),
    "prompt": (dict(num_virtual_tokens=20), "PromptTuningConfig", dict(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    "prefix": (dict(num_virtual_tokens=20), "PrefixTuningConfig",
               dict(num_virtual_tokens=20, prefix_projection=True, task_type="CAUSAL_LM")),
    "ptuning": (dict(num_virtual_tokens=20, encoder="mlp"), "PromptEncoderConfig",
                dict(num_virtual_tokens=20, encoder_reparameterization_type="MLP", task_type="CAUSAL_LM")),
    "llama_adapter": (dict(adapter_len=10), "AdaptionPromptConfig", dict(adapter_len=10, adapter_layers=30,
                                                                          task_type="CAUSAL_LM")),
    "multitask": (dict(num_virtual_tokens=20, num_tasks=4, num_ranks=1), "MultitaskPromptTuningConfig",
                  dict(num_virtual_tokens=20, num_tasks=4, num_ranks=1, task_type="CAUSAL_LM")),
}


def row_inputs(method: str, batch: int) -> dict:
    """Per-row inputs a method's forward needs besides the tokens; {} for most.

    Multitask prompt tuning names each row's task; both libraries take the same (batch,) ``task_ids``.
    Rows cycle through the tasks, so every step mixes them (as a multitask batch does).
    """
    if method != "multitask":
        return {}
    import torch

    return {"task_ids": torch.arange(batch) % METHODS[method][0]["num_tasks"]}


def measure(contender: str, steps: int, batch: int, seq: int, threads: int, lean: bool = True,
            keep_freed: bool = False) -> dict:
    import resource

    import torch

    from peftlab import runtime

    if keep_freed:
        runtime.keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from peftlab.models import load

    model, _ = load("smollm2-135m-instruct")
    lib, _, method = contender.partition(":")
    if lib == "peftlab":
        from peftlab import get_peft_model, registered_methods

        model = get_peft_model(model, registered_methods()[method].config_cls(**METHODS[method][0]))
    elif lib == "peft":
        import peft

        _, cls, kwargs = METHODS[method]
        model = peft.get_peft_model(model, getattr(peft, cls)(**kwargs))
    context = model.lean_loss if lib == "peftlab" and lean else None
    step = make_train_step(model, batch, seq, row_inputs(method, batch), context)
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [step() for _ in range(steps)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"step_s": statistics.median(times), "faults_per_step": faults / steps,
            "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-lean-loss", dest="lean", action="store_false",
                    help="peftlab without its lean loss (the ordinary forward and loss, as PEFT's)")
    ap.add_argument("--no-keep-freed-memory", dest="keep", action="store_false",
                    help="peftlab without the malloc setting peftlab.train uses on the CPU")
    ap.add_argument("--keep-freed-memory-all", dest="keep_all", action="store_true",
                    help="give PEFT and full fine-tuning the same malloc setting as peftlab")
    a = ap.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    contenders = ["full-ft"] + [f"{lib}:{m}" for m in methods for lib in ("peftlab", "peft")
                                if lib == "peftlab" or METHODS[m][1] is not None]
    print(f"train step, SmolLM2-135M fp32, batch {a.batch}x{a.seq}, {a.threads} threads, AdamW, "
          f"{a.rounds} rounds x {a.steps} timed steps (medians), peftlab lean loss {'on' if a.lean else 'off'}, "
          f"malloc keeps freed memory: {'all' if a.keep_all else 'peftlab' if a.keep else 'none'}", flush=True)

    def run(c: str) -> dict:
        keep = a.keep_all or (a.keep and c.startswith("peftlab:"))
        return run_isolated(measure, c, a.steps, a.batch, a.seq, a.threads, a.lean, keep)

    res = round_robin(contenders, a.rounds, run)
    step = {c: median(res[c], "step_s") for c in contenders}
    rss = {c: median(res[c], "peak_rss_mib") for c in contenders}
    faults = {c: median(res[c], "faults_per_step") for c in contenders}
    print("\n| method | trainable (M) | peftlab step (s) | peft step (s) | peftlab / peft | peftlab / full FT "
          "| peftlab RSS (MiB) | peft RSS (MiB) | page faults per step, peftlab / peft |")
    print("|---|---|---|---|---|---|---|---|---|")
    full = step["full-ft"]
    print(f"| full fine-tuning | {res['full-ft'][0]['trainable_m']:.1f} | {full:.2f} | | | 1.00x | {rss['full-ft']:.0f} | "
          f"| {faults['full-ft']:.0f} |")
    for m in methods:
        ours, theirs = f"peftlab:{m}", f"peft:{m}"
        has = theirs in step  # PEFT has the method
        cells = [m, f"{res[ours][0]['trainable_m']:.3f}", f"{step[ours]:.2f}",
                 f"{step[theirs]:.2f}" if has else "—", f"{step[ours] / step[theirs]:.2f}x" if has else "—",
                 f"{step[ours] / full:.2f}x", f"{rss[ours]:.0f}", f"{rss[theirs]:.0f}" if has else "—",
                 f"{faults[ours]:.0f} / {faults[theirs]:.0f}" if has else f"{faults[ours]:.0f}"]
        print("| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
