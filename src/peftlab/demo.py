"""``peftlab demo``: the main job, offline, on the bundled SmolLM2-135M-Instruct.

Shows the base model failing an invented task, trains a LoRA adapter for a few minutes on CPU,
shows it succeeding on held-out prompts, saves the adapter (megabytes), and checks the merge
formula on one layer.
"""

from __future__ import annotations

import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch

from . import LoraConfig, get_peft_model
from .data.chat import collate, encode_chat
from .data.demo import DEMO_TASK_DESCRIPTION, RECOMMENDED, demo_task, exact_match, normalize_prediction
from .models import load
from .train import TrainArgs, train
from .generation import generate_texts

BAR_BEFORE, BAR_AFTER = 0.20, 0.80


def _accuracy(predictions: list[str], answers: list[str]) -> float:
    return sum(exact_match(p, a) for p, a in zip(predictions, answers)) / max(1, len(answers))


def _show(title: str, prompts, predictions, answers, n: int = 4) -> None:
    print(f"\n{title}")
    for p, pred, ans in list(zip(prompts, predictions, answers))[:n]:
        mark = "✓" if exact_match(pred, ans) else "✗"
        print(f"  {mark} {p}\n      → {normalize_prediction(pred)!r}")


def run_demo(out_dir: str | os.PathLike = "out/demo", *, steps: int | None = None, seed: int = 0,
             threads: int = 2) -> bool:
    """Run the demo; returns True when both accuracy bars are met."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    hp = dict(RECOMMENDED)
    steps = steps or hp["steps"]

    print("Loading SmolLM2-135M-Instruct (bundled GGUF, dequantised to fp32; cached after the first run)...")
    model, tokenizer = load("smollm2-135m-instruct")
    train_set, heldout = demo_task(seed)
    prompts, answers = [e.prompt for e in heldout], [e.answer for e in heldout]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    print(f"\nTask: {DEMO_TASK_DESCRIPTION}")
    print(f"{len(train_set)} training examples, {len(heldout)} held-out prompts (names never seen in training).")

    before = generate_texts(model, tokenizer, chats, max_new_tokens=hp["max_new_tokens"], batch_size=16)
    acc_before = _accuracy(before, answers)
    _show("Base model on held-out prompts:", prompts, before, answers)

    config = LoraConfig(r=hp["r"], lora_alpha=hp["lora_alpha"], target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.trainable_parameters()
    print(f"\nLoRA r={config.r}, alpha={config.lora_alpha}, all linear layers: "
          f"{trainable:,d} trainable of {total:,d} parameters ({100 * trainable / total:.2f} %)")

    rows = [encode_chat(tokenizer, e.prompt, e.answer, hp["max_length"]) for e in train_set]
    after: list[str] = []

    def heldout_exact_match(m) -> dict[str, float]:  # the loop's final evaluation; keeps the answers to show
        after[:] = generate_texts(m, tokenizer, chats, max_new_tokens=hp["max_new_tokens"], batch_size=16)
        return {"exact_match": _accuracy(after, answers)}

    args = TrainArgs(output_dir=str(out_dir), steps=steps, batch_size=hp["batch_size"], lr=hp["lr"],
                     warmup_steps=max(1, steps // 10), schedule="cosine", seed=seed)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # every demo run trains from scratch
    result = train(peft_model, rows, args=args, collate_fn=partial(collate, pad_id=tokenizer.pad_token_id),
                   tokenizer=tokenizer, generation_eval=heldout_exact_match,
                   data_summary=f"{len(rows)} chat rows of the invented badge task ({DEMO_TASK_DESCRIPTION}); "
                                f"loss on the answer tokens only",
                   command="peftlab demo")
    print(f"trained {steps} steps in {result.seconds:.0f} s; loss {result.losses[0]:.3f} → {result.losses[-1]:.3f}")

    acc_after = result.last_eval["exact_match"]
    _show("With the LoRA adapter:", prompts, after, answers)

    adapter_dir = out_dir / "adapter"
    size_mb = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.name.startswith("adapter_")) / 2**20

    # Merge and check one layer against the formula W' = W + (alpha / r) · B A.
    path = "model.layers.0.self_attn.q_proj"
    layer = dict(peft_model.adapter_layers())[path]
    w_before = layer.base_weight.detach().clone()
    expected = w_before + config.scaling * layer.lora_B["default"] @ layer.lora_A["default"]
    peft_model.merge_adapter()
    merge_err = (layer.base_weight - expected).abs().max().item()
    peft_model.unmerge_adapter()

    ok = acc_before <= BAR_BEFORE and acc_after >= BAR_AFTER
    print("\n" + "=" * 64)
    print(f"exact match on {len(heldout)} held-out prompts: before {100 * acc_before:.1f} %  →  after {100 * acc_after:.1f} %"
          f"   (bars: ≤ {100 * BAR_BEFORE:.0f} % before, ≥ {100 * BAR_AFTER:.0f} % after)")
    print(f"trainable parameters: {100 * trainable / total:.2f} % ({trainable:,d})")
    print(f"adapter on disk: {size_mb:.2f} MB in {adapter_dir}")
    print(f"merge check on {path}: max |W_merged - (W + alpha/r·B@A)| = {merge_err:.2e}")
    print(f"loss curve: {out_dir / 'loss.png'}; model card: {out_dir / 'README.md'}")
    print(f"total time: {time.perf_counter() - t0:.0f} s — {'PASS' if ok else 'FAIL'}")
    return ok
