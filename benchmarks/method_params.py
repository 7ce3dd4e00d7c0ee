"""Trainable parameters of each method on the real models, for docs/methods.md.

Counts what each method's typical configuration trains on SmolLM2-135M-Instruct and on
all-MiniLM-L6-v2 (with a 2-class head), measured on the models — not typed in.

    python benchmarks/method_params.py
"""

from __future__ import annotations

import peftlab
from peftlab import get_peft_model, registered_methods
from peftlab.models import load

# A typical configuration per method (the paper's, scaled to these models).
CONFIGS = {
    "lora": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "loha": dict(r=8, alpha=16, target_modules="all-linear"),
    "ia3": dict(),
    "bottleneck": dict(variant="houlsby", bottleneck=64),
    "prompt": dict(num_virtual_tokens=20),
    "prefix": dict(num_virtual_tokens=20),
    "ptuning": dict(num_virtual_tokens=20, encoder="mlp"),
    "multitask": dict(num_virtual_tokens=20, num_tasks=4, num_ranks=1),
    "llama_adapter": dict(adapter_len=10),
}
PAPER = {
    "lora": "0.01–0.1 % (GPT-3, r=4 on q,v)",
    "loha": "rank r² for LoRA's parameter count",
    "ia3": "~0.01 %",
    "bottleneck": "~1–4 % (Houlsby: 3.6 % on BERT)",
    "prompt": "~0.01 %",
    "prefix": "~0.1 %",
    "ptuning": "prompt encoder, ~0.01–0.1 %",
    "multitask": "~0.035 % per task",
    "llama_adapter": "1.2 M on LLaMA-7B (0.02 %)",
}


def count(model_name: str, task: str, method: str) -> tuple[int, int, int]:
    """(trainable while training, saved in the adapter file, base parameters)."""
    model, _ = load(model_name, task=task, **({"num_labels": 2} if task == "seq-cls" else {}))
    base_total = sum(p.numel() for p in model.parameters())
    entry = registered_methods()[method]
    cfg = entry.config_cls(**CONFIGS.get(method, {}))
    peft_model = get_peft_model(model, cfg)
    trainable = sum(t.numel() for t in peft_model.adapter_state_dict().values())
    saved = sum(t.numel() for t in peft_model.adapter_state_dict(to_save=True).values())
    return trainable, saved, base_total


def main() -> None:
    rows = []
    for method in registered_methods():
        cells = []
        for model_name, task in (("smollm2-135m-instruct", "causal-lm"), ("minilm-l6", "base")):
            try:
                trainable, saved, total = count(model_name, task, method)
                cells.append(f"{trainable:,d} ({100 * trainable / total:.3f} %)"
                             + (f"; saved {saved:,d}" if saved != trainable else ""))
            except ValueError as exc:  # the method does not apply to this architecture
                cells.append(f"n/a ({str(exc).split(';')[0][:60]})")
        rows.append(f"| {method} | {cells[0]} | {cells[1]} | {PAPER.get(method, '')} |")
    print(f"peftlab {peftlab.__version__}; configurations: {CONFIGS}\n")
    print("| method | SmolLM2-135M trainable (share) | MiniLM-L6 trainable (share) | paper's claim |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
