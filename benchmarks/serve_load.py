"""Serving load: requests spread over 16 adapters vs all on 1 adapter, same concurrent load.

SmolLM2-135M-Instruct (fp32) with 16 LoRA adapters (all-linear, r=8, B random so they differ),
all resident (``max_resident=16``), served in this process by uvicorn on 127.0.0.1 (a free port).
``--clients`` threads each send ``--requests`` completions one after another (``max_tokens``
tokens each, greedy, ``ignore_eos`` so every request generates exactly that many; a different
prompt per client). Scenario "1 adapter": every client asks for a00. Scenario "16 adapters":
client i asks for a{i mod 16}. Same server, same prompts; scenarios alternate for ``--rounds``
rounds after a warm-up request per adapter.

Reported per scenario: throughput (completion tokens / wall time of the scenario), p50/p99
request latency, failed requests; and the ratio 16 adapters / 1 adapter (the bar: >= 0.8).
Loopback only, bounded load: clients × requests requests per scenario and round.

    python benchmarks/serve_load.py [--clients 16] [--requests 3] [--max-tokens 32] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time


def build_adapters(model, root: str, count: int) -> None:
    """Save ``count`` random LoRA adapters of ``model`` under ``root``; leave ``model`` plain."""
    import torch

    from peftlab import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config, "a00")
    for i in range(1, count):
        peft_model.add_adapter(f"a{i:02d}", config)
    peft_model.save_pretrained(root)
    peft_model.unload()


def run_scenario(url: str, adapters: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, client i sending ``requests`` completions for ``adapters[i % len]``."""
    import httpx

    latencies, failures, tokens = [], [], [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for j in range(requests):
                body = {"model": adapters[i % len(adapters)], "prompt": f"Tell me fact number {i * 100 + j} about the sea.",
                        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
                start = time.perf_counter()
                try:
                    reply = http.post("/v1/completions", json=body)
                    reply.raise_for_status()
                    used = reply.json()["usage"]["completion_tokens"]
                except Exception as exc:  # counted, not fatal: the bar is 0 failures
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += used

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"tokens": tokens[0], "wall_s": wall, "tok_per_s": tokens[0] / wall, "failed": len(failures),
            "p50_s": statistics.median(latencies) if latencies else float("nan"),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
            "errors": failures[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=3, help="Requests per client per scenario and round.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from peftlab.models import load
    from peftlab.serve import AdapterStore, Engine
    from peftlab.serve.app import create_app
    from peftlab.serve.server import background

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, tokenizer = load("smollm2-135m-instruct")
    names = [f"a{i:02d}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory() as root:
        build_adapters(model, root, args.adapters)
        store = AdapterStore(model.eval(), [root], max_resident=args.adapters)
        engine = Engine(store, tokenizer, max_batch=args.clients, queue_size=4 * args.clients).start()
        try:
            with background(create_app(engine)) as url:
                run_scenario(url, names, args.adapters, 1, 2)  # warm-up: attach every adapter
                scenarios = {"1 adapter": names[:1], f"{args.adapters} adapters": names}
                results = {name: [] for name in scenarios}
                for r in range(args.rounds):
                    order = list(scenarios) if r % 2 == 0 else list(reversed(scenarios))
                    for name in order:
                        results[name].append(run_scenario(url, scenarios[name], args.clients, args.requests,
                                                          args.max_tokens))
        finally:
            engine.stop()

    print(f"SmolLM2-135M fp32, {args.threads} threads, LoRA all-linear r=8; {args.clients} clients × {args.requests} "
          f"requests × {args.max_tokens} tokens; load average before {load_before[0]:.1f}, after "
          f"{os.getloadavg()[0]:.1f}")
    print("| scenario | tok/s | p50 latency (s) | p99 latency (s) | failed |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, runs in results.items():
        tps = statistics.median(r["tok_per_s"] for r in runs)
        summary[name] = {"tok_per_s": tps, "p50_s": statistics.median(r["p50_s"] for r in runs),
                         "p99_s": max(r["p99_s"] for r in runs), "failed": sum(r["failed"] for r in runs),
                         "errors": [e for r in runs for e in r["errors"]][:3]}
        s = summary[name]
        print(f"| {name} | {tps:.1f} | {s['p50_s']:.2f} | {s['p99_s']:.2f} | {s['failed']} |")
    one, many = summary["1 adapter"], summary[f"{args.adapters} adapters"]
    ratio = many["tok_per_s"] / one["tok_per_s"]
    ok = ratio >= 0.8 and one["failed"] == 0 and many["failed"] == 0
    print(f"throughput {args.adapters} adapters / 1 adapter: {ratio:.3f}× (bar >= 0.8, 0 failed): "
          f"{'PASS' if ok else 'FAIL'}")
    print(json.dumps({"ratio": ratio, **summary}))


if __name__ == "__main__":
    main()
