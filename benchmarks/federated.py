"""Federated adapters on a real task: fortunes topic classification with MiniLM over 8 clients.

The train quotes of Debian's ``fortunes`` (8 topics, see ``_fortunes.py``) are split over the
clients by Dirichlet(0.5) over the topic, so each client sees a skewed mix; every contender is
scored on the same held-out test quotes. Contenders, all LoRA r=8 on query/value (α=16) unless
named, with the same local optimiser (AdamW, lr, batch) and the same number of optimizer steps
in total (clients × rounds × local steps):

* centralized LoRA -- one model on all the training quotes; evaluated every "round" (clients ×
  local steps optimizer steps), the upper bound federated training aims at;
* federated LoRA, fedavg -- Flower FedAvg, A and B averaged separately;
* federated LoRA, svd -- the exact mean of the clients' B·A, truncated back to rank 8;
* federated LoRA, stack -- FLoRA: exact, rank grows by clients × r each round;
* federated LoHa (FedPara), r=4 -- the same parameter count as LoRA r=8, averaged per factor;
* local only -- each client trains alone on its own quotes (no communication); the mean test
  accuracy of the 8 client adapters.

Reported: test accuracy after each round, bytes sent per round and in total, and what full-model
FedAvg would have sent. Also the bytes bar of the federated design on SmolLM2-135M (LoRA r=8 on
q_proj/v_proj, computed from the real config on the meta device).

    python benchmarks/federated.py                 # the full run (hours on 2 CPU cores)
    python benchmarks/federated.py --quick         # 3 rounds of 3 local steps, 256 test quotes
    python benchmarks/federated.py --backend ray   # clients in Ray workers (Flower's simulation engine)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _fortunes import load_fortunes  # noqa: E402

from peftlab import LoHaConfig, LoraConfig, get_peft_model  # noqa: E402
from peftlab.data import collate, encode_records  # noqa: E402
from peftlab.fed.comms import human, model_bytes, tensor_bytes  # noqa: E402
from peftlab.fed.partition import describe, dirichlet  # noqa: E402
from peftlab.fed.server import ServerSpec  # noqa: E402
from peftlab.fed.settings import load_base  # noqa: E402
from peftlab.fed.simulate import simulate  # noqa: E402
from peftlab.fed.strategy import StrategyOptions  # noqa: E402
from peftlab.fed.task import FedTask, client_seed  # noqa: E402
from peftlab.models import load, load_tokenizer  # noqa: E402
from peftlab.train import TrainArgs, evaluate, train  # noqa: E402

TARGETS = ["query", "value"]
LORA = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="SEQ_CLS")
LOHA = LoHaConfig(r=4, alpha=4, target_modules=TARGETS, task_type="SEQ_CLS")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the split")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-rows", type=int, default=0, help="test quotes to score (0 = all)")
    p.add_argument("--backend", default="in-process", choices=["in-process", "ray"])
    p.add_argument("--only", default="", help="comma-separated contenders to run (default: all)")
    p.add_argument("--quick", action="store_true", help="3 rounds x 3 local steps, batch 8, 32 tokens, 256 test quotes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (per Ray worker: 1)")
    p.add_argument("--local-eval-every", type=int, default=1,
                   help="local only: score each client every N rounds (0: only before and after; the "
                        "eight clients' evaluations dominate this contender's time)")
    p.add_argument("--out", type=Path, default=Path("out/bench-federated"))
    args = p.parse_args()
    if args.quick:
        args.rounds, args.local_steps, args.batch_size, args.max_length, args.eval_rows = 3, 3, 8, 32, 256
    return args


def smollm2_bar() -> dict:
    """Bytes of LoRA r=8 (q_proj, v_proj) vs the whole SmolLM2-135M, from its config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cache = Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab")) / "models" / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        load("smollm2-135m-instruct")  # converts the GGUF once and caches config.json
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache))
    full = model_bytes(base)
    out = {"full_model_bytes": full}
    for name, targets in (("q_proj,v_proj", ["q_proj", "v_proj"]), ("all-linear", "all-linear")):
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache))
        adapter = tensor_bytes(get_peft_model(fresh, LoraConfig(r=8, target_modules=targets)).adapter_state_dict())
        out[name] = {"adapter_bytes": adapter, "ratio": full / adapter}
    return out


def federated(name, adapter, aggregation, parts, test, args, pad_id) -> dict:
    task = FedTask(build_base=partial(load_base, "minilm-l6", "classification", 8), adapter=adapter,
                   local=TrainArgs(steps=args.local_steps, batch_size=args.batch_size, lr=args.lr, progress=False),
                   pad_id=pad_id, aggregation=aggregation)
    spec = ServerSpec(rounds=args.rounds, clients=len(parts), strategy=StrategyOptions(aggregation=aggregation),
                      eval_batch_size=64)
    result = simulate(task, parts, spec, eval_rows=test, backend=args.backend,
                      report=lambda line: print(f"  [{name}] {line}", file=sys.stderr, flush=True))
    return {"accuracy": [h["accuracy"] for h in result.history],
            "bytes_per_round": [h.get("down", 0) + h.get("up", 0) for h in result.history[1:]],
            "bytes": result.traffic.total_down + result.traffic.total_up,
            "full_model_bytes": result.traffic.full_model_total,
            **({"svd_residual": [h["svd-residual"] for h in result.history[1:]]} if aggregation == "svd" else {}),
            **({"rank": [h["rank"] for h in result.history[1:]]} if aggregation == "stack" else {})}


def centralized(train_rows, test, args, pad_id) -> dict:
    """One LoRA on all the rows, the federation's total number of steps, scored every "round"."""
    torch.manual_seed(0)
    model = get_peft_model(load("minilm-l6", task="seq-cls", num_labels=8)[0], LORA)
    collate_fn = partial(collate, pad_id=pad_id)
    start = evaluate(model, test, collate_fn, batch_size=64)["accuracy"]
    per_round = args.clients * args.local_steps
    accuracy = [start]
    train(model, train_rows, args=TrainArgs(steps=args.rounds * per_round, batch_size=args.batch_size, lr=args.lr,
                                             eval_every=per_round, progress=False),
          collate_fn=collate_fn, eval_rows=test,
          on_log=lambda e: accuracy.append(e["accuracy"]) if e["event"] == "eval" else None)
    return {"accuracy": accuracy, "bytes": 0}


def local_only(parts, test, args, pad_id) -> dict:
    """Each client alone: rounds × local steps on its own rows; the mean accuracy over clients."""
    torch.manual_seed(0)  # the same head and adapter init as the other contenders
    base = get_peft_model(load("minilm-l6", task="seq-cls", num_labels=8)[0], LORA)
    initial = {k: v.detach().clone() for k, v in base.adapter_state_dict().items()}
    collate_fn = partial(collate, pad_id=pad_id)
    scores = np.full((len(parts), args.rounds + 1), np.nan)  # NaN: a round not scored (--local-eval-every)
    every = args.local_eval_every
    for c, rows in enumerate(parts):
        base.load_adapter_state_dict("default", initial)
        scores[c, 0] = evaluate(base, test, collate_fn, batch_size=64)["accuracy"]
        for r in range(1, args.rounds + 1):
            # One round = local_steps more steps with a fresh AdamW, as a federated client takes them.
            train(base, rows, collate_fn=collate_fn,
                  args=TrainArgs(steps=args.local_steps, batch_size=min(args.batch_size, len(rows)), lr=args.lr,
                                 seed=client_seed(0, r, c), progress=False))
            if r == args.rounds or (every and r % every == 0):
                scores[c, r] = evaluate(base, test, collate_fn, batch_size=64)["accuracy"]
        print(f"  [local only] client {c}: {len(rows)} rows, accuracy {scores[c, -1]:.3f}", file=sys.stderr, flush=True)
    return {"accuracy": scores.mean(0).tolist(), "per_client_final": scores[:, -1].tolist(), "bytes": 0}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    train_quotes, test_quotes, topics = load_fortunes()
    tokenizer = load_tokenizer("minilm-l6")
    pad_id = tokenizer.pad_token_id
    train_rows = encode_records(train_quotes, tokenizer, max_length=args.max_length, label_names=topics).rows
    test = encode_records(test_quotes, tokenizer, max_length=args.max_length, label_names=topics).rows
    if args.eval_rows:
        test = [test[i] for i in np.random.default_rng(0).permutation(len(test))[: args.eval_rows]]
    ids = dirichlet([r["labels"] for r in train_rows], args.clients, args.alpha, seed=0)
    parts = [[train_rows[i] for i in p] for p in ids]
    print(f"{len(train_rows)} train / {len(test)} test quotes; dirichlet:{args.alpha} over {args.clients} clients:",
          file=sys.stderr)
    for line in describe(ids, [topics[r["labels"]] for r in train_rows]):
        print("  " + line, file=sys.stderr)

    contenders = {
        "centralized LoRA": lambda: centralized(train_rows, test, args, pad_id),
        "fed LoRA fedavg": lambda: federated("fed LoRA fedavg", LORA, "fedavg", parts, test, args, pad_id),
        "fed LoRA svd": lambda: federated("fed LoRA svd", LORA, "svd", parts, test, args, pad_id),
        "fed LoRA stack": lambda: federated("fed LoRA stack", LORA, "stack", parts, test, args, pad_id),
        "fed LoHa (FedPara)": lambda: federated("fed LoHa", LOHA, "fedavg", parts, test, args, pad_id),
        "local only": lambda: local_only(parts, test, args, pad_id),
    }
    wanted = [c.strip() for c in args.only.split(",") if c.strip()] or list(contenders)
    unknown = sorted(set(wanted) - set(contenders))
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {sorted(contenders)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in wanted:
        started = time.perf_counter()
        results[name] = contenders[name]()
        results[name]["seconds"] = time.perf_counter() - started
        print(f"{name}: {results[name]['accuracy'][-1]:.3f} after {args.rounds} rounds "
              f"({results[name]['seconds']:.0f} s)", file=sys.stderr, flush=True)
        save(args, results)  # after every contender, so a stopped run keeps what it finished
    bar = smollm2_bar()

    print(f"\n### Test accuracy per round ({len(test)} test quotes, {args.clients} clients, dirichlet:{args.alpha}, "
          f"{args.local_steps} local steps of {args.batch_size}, lr {args.lr:g})\n")
    print("| contender | " + " | ".join(f"r{r}" for r in range(args.rounds + 1)) + " | sent (total) | full-model FedAvg |")
    print("|---|" + "---|" * (args.rounds + 3))
    for name, res in results.items():
        sent = human(res["bytes"]) if res["bytes"] else "0"
        full = human(res["full_model_bytes"]) if res.get("full_model_bytes") else "-"
        print(f"| {name} | " + " | ".join("—" if a != a else f"{a:.3f}" for a in res["accuracy"])
              + f" | {sent} | {full} |")
    for name, res in results.items():
        if "svd_residual" in res:
            print(f"\n{name}: SVD truncation residual per round (largest module): "
                  + ", ".join(f"{x:.3f}" for x in res["svd_residual"]))
        if "rank" in res:
            print(f"\n{name}: global rank per round: {res['rank']}; bytes per round: "
                  + ", ".join(human(b) for b in res["bytes_per_round"]))
    qv = bar["q_proj,v_proj"]
    every = bar["all-linear"]
    print(f"\nSmolLM2-135M: LoRA r=8 on q_proj,v_proj = {human(qv['adapter_bytes'])} per message vs the full model "
          f"{human(bar['full_model_bytes'])}: {qv['ratio']:.0f}x less (all-linear: {human(every['adapter_bytes'])}, "
          f"{every['ratio']:.0f}x)")
    save(args, results, smollm2=bar)


def save(args: argparse.Namespace, results: dict, **extra) -> None:
    path = args.out / "results.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results, **extra},
                              indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
