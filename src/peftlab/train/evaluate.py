"""Greedy answers for chat prompts, batched, and exact-match accuracy."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data.chat import _ids, collate


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                     batch_size: int = 16) -> list[str]:
    """Greedy-decode an assistant reply to each prompt (left-padded batches, KV cache on)."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
                if isinstance(i, int) and i >= 0]
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = [{"input_ids": _ids(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                                 add_generation_prompt=True, tokenize=True))}
                for p in chunk]
        batch = collate(rows, pad_id, padding_side="left")
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             eos_token_id=stop_ids)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=False)
    return answers


def accuracy(predictions: Sequence[str], answers: Sequence[str], match: Callable[[str, str], bool]) -> float:
    return sum(match(p, a) for p, a in zip(predictions, answers)) / max(1, len(answers))
