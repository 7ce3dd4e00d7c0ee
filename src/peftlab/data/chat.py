"""Chat rows → token ids with completion-only labels, and padded batches."""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

IGNORE = -100
Batch = dict[str, torch.Tensor]


def encode_chat(tokenizer, prompt: str, answer: str, max_length: int | None = None) -> dict[str, list[int]]:
    """Render one user→assistant turn with the tokenizer's chat template.

    Labels are -100 on the prompt (everything up to and including the assistant header), so the
    loss is on the answer and its end-of-turn token only.
    """
    user = [{"role": "user", "content": prompt}]
    prompt_ids = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
    full_ids = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=True))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently once an answer follows; "
                         "completion-only labels need a prefix-stable template")
    # Some templates add a trailing newline after the end-of-turn token; it is not worth learning.
    while full_ids and tokenizer.decode(full_ids[-1:]).strip() == "" and len(full_ids) > len(prompt_ids) + 1:
        full_ids = full_ids[:-1]
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids):]
    if max_length is not None:
        full_ids, labels = full_ids[:max_length], labels[:max_length]
    return {"input_ids": full_ids, "labels": labels}


def _ids(rendered) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    if hasattr(rendered, "keys") and "input_ids" in rendered:
        rendered = rendered["input_ids"]
    return list(rendered)


def collate(rows: Sequence[dict[str, list[int]]], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad rows to the longest; labels pad with -100, attention_mask marks real tokens."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        n = len(r["input_ids"])
        pad = width - n

        def padded(seq, fill):
            return seq + [fill] * pad if padding_side == "right" else [fill] * pad + seq

        out["input_ids"].append(padded(r["input_ids"], pad_id))
        out["attention_mask"].append(padded([1] * n, 0))
        out["labels"].append(padded(r.get("labels", r["input_ids"]), IGNORE))
    return {k: torch.tensor(v) for k, v in out.items()}


def iterate_batches(rows: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int, seed: int = 0) -> Iterator[Batch]:
    """Endless shuffled batches: a new permutation each epoch, deterministic in ``seed``."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([rows[j] for j in order[i:i + batch_size]], pad_id)
