"""Text in, text out: batched generation from plain prompts or chat conversations.

A conversation (a list of ``{"role", "content"}`` messages) is rendered with the tokenizer's chat
template, ending with the assistant header; a plain string is tokenised as it is. Decoder-only
batches are left-padded so every row's text ends where generation starts.
"""

from __future__ import annotations

from typing import Sequence

import torch

Message = dict[str, str]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, item: str | list[Message]) -> list[int]:
    if isinstance(item, str):
        ids = tokenizer(item)["input_ids"]
    elif not has_chat_template(tokenizer):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template, so conversations cannot be rendered; "
                         f"pass plain prompts (peftlab generate --no-chat)")
    else:
        text = tokenizer.apply_chat_template(item, add_generation_prompt=True, tokenize=False)
        # The template writes any special tokens (bos, turn markers) itself.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {item!r} encodes to no tokens; give some text")
    return ids


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T_max), padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-text ids of the tokenizer and of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


@torch.no_grad()
def generate_texts(model, tokenizer, inputs: Sequence[str | list[Message]], *, max_new_tokens: int = 64,
                   temperature: float = 0.0, batch_size: int = 8) -> list[str]:
    """One completion per input: greedy when ``temperature`` is 0, else sampled at ``temperature``
    (seed ``torch.manual_seed`` first for repeatable samples). Special tokens are dropped from the text."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(inputs), batch_size):
        ids, mask = _left_pad([encode_prompt(tokenizer, item) for item in inputs[start:start + batch_size]], pad_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=stop_ids(model, tokenizer), **sampling)
        # Decoder-only models return the prompt in front of the new tokens; encoder-decoders only the latter.
        new = out if encoder_decoder else out[:, ids.shape[1]:]
        texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts


def prompt_and_reference(row: dict) -> tuple[str | list[Message], str]:
    """What to generate from and what should come out, for a chat row (everything before the last
    assistant turn → that turn's content) or a prompt/completion row."""
    if "messages" in row:
        messages = list(row["messages"])
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError("a chat row without an assistant turn has no reference answer to match")
        return messages[:last], messages[last]["content"]
    if "prompt" in row and "completion" in row:
        completion = row["completion"]
        reference = completion if isinstance(completion, str) else completion[-1]["content"]
        return row["prompt"], reference
    raise ValueError(f"exact match needs chat or prompt/completion rows, got keys {sorted(row)}")


def exact_match_rate(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 64, batch_size: int = 8) -> float:
    """Share of rows whose greedy answer equals the reference, whitespace-normalised."""
    pairs = [prompt_and_reference(row) for row in rows]
    answers = generate_texts(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    same = sum(" ".join(a.split()) == " ".join(ref.split()) for a, (_, ref) in zip(answers, pairs))
    return same / max(1, len(pairs))
