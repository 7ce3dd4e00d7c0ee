"""Tiny end-to-end runs: LoRA learns a synthetic task, deterministically."""

import pytest
import torch

from peftlab import LoraConfig, get_peft_model
from peftlab.models import tiny
from peftlab.train import train
from peftlab.train.loop import lr_factor


def batches(seed=0):
    # A learnable rule: every sequence counts up by one modulo 50, from a random start.
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(3, 50, (8, 1), generator=g)
        ids = 3 + (start + torch.arange(12)) % 50
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run(seed=0, steps=40):
    torch.manual_seed(seed)
    # lm_head is adapted too: the tiny model's frozen random head cannot produce peaked logits.
    config = LoraConfig(r=8, lora_alpha=16, target_modules=r".*(_proj|lm_head)")
    model = get_peft_model(tiny("llama", "causal-lm", seed=0), config)
    return train(model, batches(seed), steps=steps, lr=1e-2, progress=False).losses


def test_lora_training_lowers_loss_and_is_deterministic():
    losses = run()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.2 * first, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    assert run() == losses, "same seed, same losses"


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0) and lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(3, 10, 0, "exp")


def test_no_trainable_parameters_is_an_error():
    model = get_peft_model(tiny("llama", "causal-lm"), LoraConfig(target_modules=["q_proj"]))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, batches(), steps=1, progress=False)
