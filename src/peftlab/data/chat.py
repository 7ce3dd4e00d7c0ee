"""Chat rows → token ids with labels on the assistant turns only, and padded batches."""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch
from jinja2 import TemplateError

from .sources import DataError

IGNORE = -100
Batch = dict[str, torch.Tensor]


def render_chat(tokenizer, messages: list[dict], *, train_from: int = 0) -> tuple[list[int], list[int]]:
    """Render a conversation with the tokenizer's chat template; label its assistant turns.

    Each assistant message ``i`` (with ``i >= train_from``) is located by rendering twice:
    ``messages[:i]`` with the generation prompt (everything up to and including the assistant
    header) and ``messages[:i + 1]``; the turn's tokens are the difference. This needs a
    prefix-stable template (each rendering a prefix of the next and of the whole conversation), as
    ChatML templates such as SmolLM2's are; otherwise the turn cannot be located and a
    ``ValueError`` says so.

    Returns ``(input_ids, labels)``, two lists of equal length: labels equal the ids on assistant
    turns (content and end-of-turn token) and are ``-100`` elsewhere. Whitespace a template puts
    after an end-of-turn token is left unsupervised, and dropped at the very end of the
    conversation (it carries nothing to learn).

    Raises:
        DataError: the tokenizer has no chat template (no row can be rendered).
        ValueError: the template rejects this conversation, or is not prefix-stable on it.
    """
    require_chat_template(tokenizer)
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i in range(train_from, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        context = _render(tokenizer, messages[:i], generation_prompt=True)
        turn = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if turn[:len(context)] != context or ids[:len(turn)] != turn:
            raise ValueError(
                f"the chat template renders messages[:{i}] differently once the assistant message "
                f"{i} follows, so that turn's tokens cannot be located; completion-only labels need "
                "a prefix-stable template (or use {\"prompt\", \"completion\"} string rows)")
        end = len(turn)
        while end > len(context) + 1 and _is_blank(tokenizer, turn[end - 1]):
            end -= 1
        labels[len(context):end] = turn[len(context):end]
    end = len(ids)
    while end > 1 and labels[end - 1] == IGNORE and _is_blank(tokenizer, ids[end - 1]):
        end -= 1
    return ids[:end], labels[:end]


def require_chat_template(tokenizer) -> None:
    """Raise :class:`DataError` unless ``tokenizer`` has a chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"tokenizer {name} has no chat template; use {{\"prompt\", \"completion\"}} "
                        "or {\"text\"} rows, or pass a tokenizer with one")


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                 tokenize=True)
    except TemplateError as err:  # e.g. a template's raise_exception("roles must alternate")
        raise ValueError(f"the chat template rejects this conversation: {err}") from err
    return _ids(rendered)


def _is_blank(tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def encode_chat(tokenizer, prompt: str, answer: str, max_length: int | None = None) -> dict[str, list[int]]:
    """One user→assistant exchange as ``{"input_ids", "labels"}``; labels on the answer and its
    end-of-turn token only (see :func:`render_chat`), both cut to ``max_length`` if given."""
    ids, labels = render_chat(tokenizer, [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": answer}])
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def _ids(rendered) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    if hasattr(rendered, "keys") and "input_ids" in rendered:
        rendered = rendered["input_ids"]
    return list(rendered)


def collate(rows: Sequence[dict], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad rows to the longest and stack them.

    Each row has ``input_ids`` (list of ints) and optionally ``labels``: a list as long as the ids
    (language modelling; padded with -100), or an int (classification). A row without labels
    gets its own ids as labels.

    Returns ``input_ids`` (B, T), ``attention_mask`` (B, T; 1 on real tokens) and ``labels``:
    (B, T), or (B,) int64 class indices when the rows' labels are ints.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}; use 'right' or 'left'")
    width = max(len(r["input_ids"]) for r in rows)
    classes = [isinstance(r.get("labels"), int) for r in rows]
    if any(classes) and not all(classes):
        raise ValueError("collate got rows with int labels (classification) mixed with rows with "
                         "token labels (language modelling); batch one kind at a time")
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = width - len(r["input_ids"])

        def padded(seq, fill):
            return seq + [fill] * pad if padding_side == "right" else [fill] * pad + seq

        out["input_ids"].append(padded(r["input_ids"], pad_id))
        out["attention_mask"].append(padded([1] * len(r["input_ids"]), 0))
        out["labels"].append(r["labels"] if all(classes) else padded(r.get("labels", r["input_ids"]), IGNORE))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def iterate_batches(rows: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int, seed: int = 0) -> Iterator[Batch]:
    """Endless shuffled batches: a new permutation each epoch, deterministic in ``seed``."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([rows[j] for j in order[i:i + batch_size]], pad_id)
