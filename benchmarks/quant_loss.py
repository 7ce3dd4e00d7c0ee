"""How much the 4- and 8-bit bases cost before any training: peftlab's NF4/int8 vs bitsandbytes' NF4.

SmolLM2-135M-Instruct's causal-LM loss on held-out Debian ``fortunes`` quotes (the same text the
lean step's loss curves train on) with every linear layer but the output head replaced by its
quantise → dequantise round trip: fp32, peftlab int8 (per-row absmax), peftlab NF4 (block 64, with
and without double-quantised scales) and bitsandbytes' NF4 (QLoRA's own code, run on CPU through
its functional API), plus bitsandbytes' FP4 for scale. Also the mean |W − Ŵ| over the layers.

It answers one question: is a gap between the NF4 and the fp32 base peftlab's, or NF4's? When
peftlab's NF4 and bitsandbytes' NF4 give the same loss, it is NF4's.

    python benchmarks/quant_loss.py [--quotes 64] [--max-length 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _fortunes import load_fortunes  # noqa: E402

from peftlab.models import load  # noqa: E402
from peftlab.quant import int8, nf4  # noqa: E402


def round_trips() -> dict:
    """name -> W ↦ dequantise(quantise(W)), same shape."""
    import bitsandbytes.functional as bnb

    def ours_nf4(double_quant):
        return lambda w: nf4.dequantize(nf4.quantize(w, double_quant=double_quant), w.shape).view_as(w)

    def theirs(quant_type, double_quant=True):
        return lambda w: bnb.dequantize_4bit(*bnb.quantize_4bit(w, quant_type=quant_type, blocksize=64,
                                                                compress_statistics=double_quant))

    return {
        "peftlab int8": lambda w: int8.dequantize(int8.quantize(w), w.shape).view_as(w),
        "peftlab NF4": ours_nf4(True),
        "peftlab NF4, fp32 scales": ours_nf4(False),
        "bitsandbytes NF4": theirs("nf4"),
        "bitsandbytes NF4, fp32 scales": theirs("nf4", False),
        "bitsandbytes FP4": theirs("fp4"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quotes", type=int, default=64, help="held-out quotes scored")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tokenizer = load("smollm2-135m-instruct")
    _, test, _ = load_fortunes()
    enc = tokenizer([r["text"] for r in test[: a.quotes]], return_tensors="pt", padding=True,
                    truncation=True, max_length=a.max_length)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)

    def loss() -> float:
        with torch.no_grad():
            return sum(model(input_ids=enc.input_ids[i:i + 16], attention_mask=enc.attention_mask[i:i + 16],
                             labels=labels[i:i + 16]).loss.item() * int((labels[i:i + 16, 1:] != -100).sum())
                       for i in range(0, len(labels), 16)) / int((labels[:, 1:] != -100).sum())

    layers = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    original = {n: m.weight.detach().clone() for n, m in layers}
    rows = [("fp32", loss(), 0.0)]
    for name, trip in round_trips().items():
        error = 0.0
        for n, m in layers:
            back = trip(original[n])
            error += float((back - original[n]).abs().mean()) / len(layers)
            m.weight.data.copy_(back)
        rows.append((name, loss(), error))
        print(f"  {name}: loss {rows[-1][1]:.4f}", file=sys.stderr, flush=True)
        for n, m in layers:
            m.weight.data.copy_(original[n])
    print(f"\nSmolLM2-135M-Instruct, {len(labels)} held-out fortunes quotes (≤ {a.max_length} tokens), "
          f"{len(layers)} linear layers quantised (output head kept)\n")
    print("| base | loss | vs fp32 | mean abs weight error |\n|---|---|---|---|")
    for name, value, error in rows:
        print(f"| {name} | {value:.4f} | {value - rows[0][1]:+.4f} | {error:.2e} |")


if __name__ == "__main__":
    main()
