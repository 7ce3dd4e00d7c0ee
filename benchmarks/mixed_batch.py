"""Mixed-adapter batches on SmolLM2-135M: peftlab (src/peftlab/ops/) vs Hugging Face PEFT.

Prefill: one forward of batch × seq random tokens (logits for every position, as a plain forward
returns them) — the base model; peftlab with one adapter for the whole batch (unmerged); peftlab
and PEFT with a different adapter per row (``adapter_names=``).
Decode: greedy generation of ``--new-tokens`` tokens (min = max, so no row stops early) from a
batch whose rows cycle through ``--decode-adapters`` adapters — the base model, peftlab, PEFT.

Adapters: LoRA r=8, alpha=16 on every linear layer (q, k, v, o, gate, up, down), A and B random and
non-zero, written once in PEFT's format and loaded frozen into both libraries, as a server loads
them. Before timing, the two libraries' mixed-batch logits are compared. Time: the three models
live in one process and take turns (round-robin with rotating order after a warm-up; medians).

    python benchmarks/mixed_batch.py [--rounds 3] [--adapters 16] [--batch 16] [--seq 128]
        [--decode-batch 4] [--decode-adapters 3] [--new-tokens 32] [--prompt 32] [--threads 2]
        [--only prefill|decode]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import time_round_robin  # noqa: E402

MODEL = "smollm2-135m-instruct"
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear")


def write_adapters(directory: str, n: int) -> list[str]:
    """``n`` random LoRA adapters (B non-zero) saved in PEFT's format under ``directory/<name>``."""
    import torch

    from peftlab import LoraConfig, get_peft_model
    from peftlab.models import load

    names = [f"a{i}" for i in range(n)]
    torch.manual_seed(0)
    model = get_peft_model(load(MODEL)[0], LoraConfig(**LORA, init_lora_weights=False), names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**LORA, init_lora_weights=False))
    model.save_pretrained(directory, format="peft")
    return names


def load_models(directory: str, names: list[str]):
    """(base, peftlab, peft): three copies of the model, the adapters loaded frozen into two."""
    import peft

    import peftlab
    from peftlab.models import load

    base = load(MODEL)[0].eval()
    ours = peftlab.PeftModel.from_pretrained(load(MODEL)[0], os.path.join(directory, names[0]), names[0])
    theirs = peft.PeftModel.from_pretrained(load(MODEL)[0], os.path.join(directory, names[0]), names[0])
    for name in names[1:]:
        ours.load_adapter(os.path.join(directory, name), name)
        theirs.load_adapter(os.path.join(directory, name), adapter_name=name)
    return base, ours.eval(), theirs.eval()


def timed(fn):
    def step() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--decode-batch", type=int, default=4)
    ap.add_argument("--decode-adapters", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length of the decode batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["prefill", "decode"])
    a = ap.parse_args()
    if not 1 <= a.decode_adapters <= a.adapters:
        ap.error(f"--decode-adapters must be between 1 and --adapters ({a.adapters}), got {a.decode_adapters}")

    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_adapters(tmp, a.adapters)
        base, ours, theirs = load_models(tmp, names)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    print(f"SmolLM2-135M fp32, {a.threads} threads, {a.adapters} LoRA r=8 all-linear adapters loaded; "
          f"torch {torch.__version__}; {a.rounds} rounds after a warm-up, medians; "
          f"load average {os.getloadavg()[0]:.1f} (other processes share the cores)", flush=True)

    with torch.inference_mode():
        rows = [names[i % a.adapters] for i in range(a.batch)]
        ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)
        check = {"input_ids": ids[:4, :16], "attention_mask": torch.ones_like(ids[:4, :16])}
        diff = (ours(**check, adapter_names=rows[:4]).logits - theirs(**check, adapter_names=rows[:4]).logits).abs().max()
        print(f"peftlab vs PEFT mixed-batch logits: max |difference| {diff.item():.2e}", flush=True)
        if diff > 1e-3:
            raise SystemExit("the two libraries disagree; timings would compare different computations")

        if a.only != "decode":
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

            def peftlab_one():
                ours.set_adapter(names[0])
                ours(**batch)

            steps = {"base": timed(lambda: base(**batch)), "peftlab 1 adapter": timed(peftlab_one),
                     "peftlab mixed": timed(lambda: ours(**batch, adapter_names=rows)),
                     "peft mixed": timed(lambda: theirs(**batch, adapter_names=rows))}
            print(f"\nprefill {a.batch}x{a.seq}, {min(a.batch, a.adapters)} different adapters", flush=True)
            t = {k: statistics.median(v) for k, v in time_round_robin(steps, a.rounds).items()}
            print("\n| prefill | time (s) | vs base |\n|---|---|---|")
            for k, v in t.items():
                print(f"| {k} | {v:.2f} | {v / t['base']:.2f}× |")

        if a.only != "prefill":
            drows = [names[i % a.decode_adapters] for i in range(a.decode_batch)]
            prompt = torch.randint(0, vocab, (a.decode_batch, a.prompt), generator=g)
            kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                      max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0)
            steps = {"base": timed(lambda: base.generate(**kw)),
                     "peftlab mixed": timed(lambda: ours.generate(**kw, adapter_names=drows)),
                     "peft mixed": timed(lambda: theirs.generate(**kw, adapter_names=drows))}
            print(f"\ngreedy decode {a.decode_batch} rows ({a.decode_adapters} adapters) x {a.new_tokens} new tokens "
                  f"after a {a.prompt}-token prompt", flush=True)
            t = {k: statistics.median(v) for k, v in time_round_robin(steps, a.rounds).items()}
            tok = a.decode_batch * a.new_tokens
            print("\n| decode | tok/s | vs base |\n|---|---|---|")
            for k, v in t.items():
                print(f"| {k} | {tok / v:.1f} | {t['base'] / v:.2f}× |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
