"""Shared pieces of the training tests: synthetic rows, a collate, a tiny LoRA llama."""

import torch

from peftlab import LoraConfig, get_peft_model
from peftlab.data import collate as pad_rows
from peftlab.models import tiny


def collate(rows):
    """The tiny models pad with id 0."""
    return pad_rows(rows, pad_id=0)


def counting_rows(n, seed=0, length=12):
    """A learnable rule: each row counts up by one modulo 50 from a random start; loss on every token."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(3, 50, (n,), generator=g).tolist()
    rows = []
    for s in starts:
        ids = [3 + (s + i) % 50 for i in range(length)]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def lora_llama(seed=0):
    """A tiny llama with LoRA on every projection and the head (a frozen random head cannot produce
    peaked logits)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=r".*(_proj|lm_head)")
    return get_peft_model(tiny("llama", "causal-lm", seed=0), config)


def resume_args(output_dir):
    """The run of the resume test (tests/train/test_resume.py and its killed process)."""
    from peftlab.train import TrainArgs

    return TrainArgs(output_dir=str(output_dir), steps=6, batch_size=4, lr=1e-2, save_every=2, progress=False)
