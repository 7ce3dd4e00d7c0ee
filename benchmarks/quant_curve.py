"""Does LoRA on a quantised base learn as well as on the fp32 base? Loss curves over several seeds.

The same LoRA (r=8, α=16, all linear layers) trains on the fp32 base and on peftlab's NF4 (and,
with ``--bases``, int8) base, once per seed. A seed sets the data order, LoRA's initialisation and,
for classification, the fresh head, so the fp32 runs' spread across seeds is the noise a quantised
base is measured against. Every ``--eval-every`` steps the model is scored on held-out rows.

Two real tasks on Debian's ``fortunes`` (read from the installed package at run time):

- ``cls``: all-MiniLM-L6-v2 with a fresh 8-way head, topic classification (as ``quality.py``);
  eval loss and accuracy on held-out quotes.
- ``lm``: SmolLM2-135M-Instruct, the quotes as causal-LM text (as ``lean_step.py``'s curves);
  eval loss on held-out quotes.

Verdict per eval point: the quantised base is *within noise* when its mean over seeds differs from
fp32's mean by at most two standard errors of that difference (√(s²_fp32/n + s²_q/n)).

    python benchmarks/quant_curve.py --task cls                  # ~40 min on 2 cores (6 runs)
    python benchmarks/quant_curve.py --task lm --steps 40 --eval-every 10 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fortunes import load_fortunes  # noqa: E402

from peftlab import LoraConfig, get_peft_model  # noqa: E402
from peftlab.data import collate, encode_records  # noqa: E402
from peftlab.models import load  # noqa: E402
from peftlab.train import TrainArgs, evaluate, train  # noqa: E402

TASKS = {  # task -> (model alias, load task, LoRA task type, peak lr)
    "cls": ("minilm-l6", "seq-cls", "SEQ_CLS", 1e-3),
    "lm": ("smollm2-135m-instruct", "causal-lm", "CAUSAL_LM", 1e-3),
}


def encode(task: str, tokenizer, max_length: int, eval_rows: int):
    """(train rows, held-out rows, number of labels) for ``task``."""
    train_rows, test_rows, _ = load_fortunes()
    test_rows = test_rows[:eval_rows]
    if task == "cls":
        tr = encode_records(((f"row {i}", r) for i, r in enumerate(train_rows)), tokenizer, max_length=max_length)
        te = encode_records(((f"row {i}", r) for i, r in enumerate(test_rows)), tokenizer, max_length=max_length,
                            label_names=tr.label_names)
        return tr.rows, te.rows, len(tr.label_names)
    text = [{"text": r["text"]} for r in train_rows]
    held = [{"text": r["text"]} for r in test_rows]
    return (encode_records(text, tokenizer, kind="text", max_length=max_length).rows,
            encode_records(held, tokenizer, kind="text", max_length=max_length).rows, None)


def run(task: str, base: str, seed: int, rows, held, num_labels, opts) -> dict:
    """One LoRA training run; its per-step losses and its evaluations."""
    alias, load_task, task_type, lr = TASKS[task]
    torch.manual_seed(seed)  # the fresh head (cls) and LoRA's A
    model, tokenizer = load(alias, task=load_task, num_labels=num_labels, quantize=None if base == "fp32" else base)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type=task_type))
    args = TrainArgs(steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr or lr, warmup_steps=opts.steps // 10,
                     schedule="linear", seed=seed, eval_every=opts.eval_every, progress=False)
    collate_fn = lambda b: collate(b, tokenizer.pad_token_id)  # noqa: E731
    evals = [{"step": 0, **evaluate(model, held, collate_fn, batch_size=64)}]  # the quantised base's own cost
    result = train(model, rows, args=args, eval_rows=held, collate_fn=collate_fn,
                   on_log=lambda record: evals.append(record) if "eval_loss" in record else None)
    return {"base": base, "seed": seed, "losses": result.losses, "seconds": result.seconds,
            "evals": [{k: e[k] for k in ("step", "eval_loss", "accuracy") if k in e} for e in evals]}


def within_noise(reference: list[float], other: list[float]) -> dict:
    """Mean gap (other − reference) against two standard errors of the difference of means."""
    n_r, n_o = len(reference), len(other)
    sd_r = statistics.stdev(reference) if n_r > 1 else float("nan")
    sd_o = statistics.stdev(other) if n_o > 1 else float("nan")
    gap = statistics.fmean(other) - statistics.fmean(reference)
    two_se = 2 * math.sqrt(sd_r ** 2 / n_r + sd_o ** 2 / n_o)
    return {"gap": gap, "sd_fp32": sd_r, "sd_other": sd_o, "two_se": two_se, "within_noise": abs(gap) <= two_se}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=list(TASKS), default="cls")
    ap.add_argument("--bases", nargs="*", default=["fp32", "nf4"], choices=["fp32", "nf4", "int8"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-rows", type=int, default=512, help="held-out quotes scored at each evaluation")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the task's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write every run here")
    opts = ap.parse_args()
    if opts.bases[:1] != ["fp32"]:
        ap.error("--bases must start with fp32, the reference")
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()

    _, tokenizer = load(TASKS[opts.task][0], task="base")
    rows, held, num_labels = encode(opts.task, tokenizer, opts.max_length, opts.eval_rows)
    runs = []
    for seed in range(opts.seeds):  # round-robin over bases, so drift in machine speed hits all alike
        for base in opts.bases:
            runs.append(run(opts.task, base, seed, rows, held, num_labels, opts))
            last = runs[-1]["evals"][-1]
            print(f"  {base} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step")
                  + f" ({runs[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)

    steps = [e["step"] for e in runs[0]["evals"]]
    metrics = ["eval_loss"] + (["accuracy"] if "accuracy" in runs[0]["evals"][0] else [])
    print(f"\n{opts.task}: {TASKS[opts.task][0]}, LoRA r=8 all-linear, {opts.steps} steps x batch {opts.batch_size} "
          f"(≤ {opts.max_length} tokens), {opts.seeds} seeds, {len(held)} held-out quotes\n")
    verdicts = []
    for metric in metrics:
        print(f"| {metric} at step | " + " | ".join(f"{b} (mean ± sd)" for b in opts.bases)
              + " | " + " | ".join(f"{b} − fp32 (2 SE)" for b in opts.bases[1:]) + " |")
        print("|---|" + "---|" * (2 * len(opts.bases) - 1))
        for i, step in enumerate(steps):
            values = {b: [r["evals"][i][metric] for r in runs if r["base"] == b] for b in opts.bases}
            cells = [f"{statistics.fmean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}" for v in values.values()]
            for b in opts.bases[1:]:
                v = within_noise(values["fp32"], values[b])
                verdicts.append({"metric": metric, "step": step, "base": b, **v})
                cells.append(f"{v['gap']:+.4f} ({v['two_se']:.4f}){'' if v['within_noise'] else ' ✗'}")
            print(f"| {step} | " + " | ".join(cells) + " |")
        print()
    final = [v for v in verdicts if v["step"] == steps[-1]]
    print("within noise at the last step: " + ", ".join(f"{v['base']} {v['metric']}: {v['within_noise']}" for v in final))
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = opts.json.with_name(f".{opts.json.name}.tmp")
        tmp.write_text(json.dumps({"options": {k: str(v) for k, v in vars(opts).items()}, "runs": runs,
                                   "verdicts": verdicts}, indent=1))
        tmp.replace(opts.json)


if __name__ == "__main__":
    main()
