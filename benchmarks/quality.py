"""Quality: topic classification of Debian's ``fortunes`` with MiniLM, full fine-tuning vs PEFT.

Every contender starts from the same all-MiniLM-L6-v2 with the same fresh 8-way head (seeded),
sees the same training rows in the same order (peftlab's seeded sampler) for the same number of
steps, and is scored on the same held-out quotes. The PEFT methods train through
``peftlab.train.train``; full fine-tuning runs the same steps in a plain AdamW loop over every
weight. Reported: test accuracy, trainable share, and train time (2 threads; the contenders run
one after another, so times are comparable only roughly on this noisy machine).

    python benchmarks/quality.py                 # all contenders, ~25 min on 2 cores
    python benchmarks/quality.py --only lora ia3 --steps 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fortunes import load_fortunes  # noqa: E402

from peftlab import BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from peftlab.data import collate, encode_records  # noqa: E402
from peftlab.models import load  # noqa: E402
from peftlab.train import TrainArgs, evaluate, train  # noqa: E402
from peftlab.train.loop import lr_factor  # noqa: E402
from peftlab.train.sampler import Sampler  # noqa: E402

# Learning rates: the usual ranges for each family (full FT ~5e-5, LoRA/adapters ~1e-3, IA3 and
# prompts higher since they train so few numbers); the head trains with every method (SEQ_CLS).
CONTENDERS = {
    "full": (None, 5e-5),
    "lora": (LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"), 1e-3),
    "adapter": (BottleneckConfig(variant="pfeiffer", bottleneck=64, task_type="SEQ_CLS"), 1e-3),
    "houlsby": (BottleneckConfig(variant="houlsby", bottleneck=64, task_type="SEQ_CLS"), 2e-3),
    "ia3": (IA3Config(task_type="SEQ_CLS"), 5e-3),
    "prompt": (PromptTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"), 3e-2),
    "prefix": (PrefixTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"), 5e-3),
}


def full_finetune(model, rows, args: TrainArgs, collate_fn) -> float:
    """Plain AdamW over every weight, same batches and schedule as peftlab's loop; returns seconds."""
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sampler = Sampler(len(rows), args.batch_size, args.seed)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup_steps, args.schedule)
        batch = collate_fn([rows[i] for i in sampler.indices(step)])
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--steps", type=int, default=540, help="optimizer steps (540 × 32 rows ≈ 3 epochs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()  # the fresh head's load report, once per contender

    train_rows, test_rows, topics = load_fortunes()
    _, tokenizer = load("minilm-l6", task="base")
    encoded = encode_records(((f"row {i}", r) for i, r in enumerate(train_rows)), tokenizer, max_length=opts.max_length)
    test = encode_records(((f"row {i}", r) for i, r in enumerate(test_rows)), tokenizer, max_length=opts.max_length,
                          label_names=encoded.label_names)
    print(f"fortunes: {len(encoded.rows)} train / {len(test.rows)} test quotes, {len(topics)} topics; "
          f"{encoded.summary()}", file=sys.stderr)

    def collate_fn(rows):
        return collate(rows, tokenizer.pad_token_id)

    results = []
    for name in opts.only:
        config, lr = CONTENDERS[name]
        args = TrainArgs(steps=opts.steps, batch_size=opts.batch_size, lr=lr, warmup_steps=opts.steps // 10,
                         schedule="linear", seed=opts.seed, progress=False)
        torch.manual_seed(opts.seed)  # the same fresh head for everyone
        model, _ = load("minilm-l6", task="seq-cls", num_labels=len(encoded.label_names))
        if config is None:
            seconds = full_finetune(model, encoded.rows, args, collate_fn)
            trainable = total = sum(p.numel() for p in model.parameters())
        else:
            model = get_peft_model(model, config)
            seconds = train(model, encoded.rows, args=args, collate_fn=collate_fn).seconds
            trainable, total = model.trainable_parameters()
        metrics = evaluate(model, test.rows, collate_fn, batch_size=64)
        row = {"method": name, "accuracy": metrics["accuracy"], "trainable": trainable,
               "share": trainable / total, "train_s": seconds, "lr": lr}
        results.append(row)
        print(f"{name:8s} accuracy {100 * row['accuracy']:.2f} %  trainable {trainable:,d} "
              f"({100 * row['share']:.3f} %)  {seconds:.0f} s", file=sys.stderr, flush=True)

    full = next((r for r in results if r["method"] == "full"), None)
    print("\n| method | test accuracy | vs full FT | trainable | share | train time |")
    print("|---|---|---|---|---|---|")
    for r in results:
        delta = f"{100 * (r['accuracy'] - full['accuracy']):+.2f} pt" if full else "—"
        print(f"| {r['method']} | {100 * r['accuracy']:.2f} % | {delta} | {r['trainable']:,d} | "
              f"{100 * r['share']:.3f} % | {r['train_s']:.0f} s |")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
