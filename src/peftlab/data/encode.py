"""Rows → token ids and labels: validation, the four row kinds, truncation and packing.

* ``chat`` -- ``{"messages": [{"role", "content"}, ...]}``, rendered with the tokenizer's chat
  template; labels on every assistant turn (content + end-of-turn token), -100 elsewhere.
* ``prompt-completion`` -- ``{"prompt": str, "completion": str}``, or both message lists
  (conversational, rendered with the template); -100 on the prompt, labels on the completion
  (+ eos or end-of-turn token).
* ``text`` -- ``{"text": str}``; labels on every token (+ eos).
* ``classification`` -- ``{"text": str, "label": str | int}``; one class index per row.

Every row is checked before it is encoded; a bad one raises :class:`DataError` naming where it
is, what is wrong and the fix, or with ``skip_bad_rows=True`` is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .chat import IGNORE, render_chat, require_chat_template
from .sources import DataError

KINDS = ("chat", "prompt-completion", "text", "classification")
ROLES = ("system", "user", "assistant", "tool")
FORMATS = ('{"messages": [{"role", "content"}, ...]} (chat), {"prompt", "completion"}, {"text"}, '
           'or {"text", "label"} (classification)')
_FIX = "fix the row or pass --skip-bad-rows (skip_bad_rows=True)"


@dataclass
class EncodedData:
    """Encoded rows, ready for :func:`peftlab.data.collate`, and what happened on the way."""

    rows: list[dict]
    """``{"input_ids": [...], "labels": [...]}`` (same length) for language-modelling kinds;
    ``{"input_ids": [...], "labels": int}`` for classification."""
    kind: str
    """One of :data:`KINDS`."""
    label_names: list[str] | None
    """Classification: class index → name (``["0", "1", ...]`` for integer labels); else None."""
    rows_read: int
    """Rows read from the source, bad ones included."""
    truncated: int
    """Rows longer than ``max_length``, cut to it (0 when packing: rows flow across blocks)."""
    skipped: int
    """Bad rows skipped (``skip_bad_rows=True``)."""
    tokens: int
    """Tokens in :attr:`rows`."""
    max_length: int | None = None
    """The ``max_length`` rows were cut or packed to; None = no limit."""
    packed: bool = False
    """Whether :attr:`rows` are packed blocks of exactly ``max_length`` tokens."""
    dropped_tokens: int = 0
    """Packing: tokens at the end of the concatenation too few to fill a block, dropped."""

    def summary(self) -> str:
        """One line, e.g. ``"1,000 rows (chat): 12 truncated to 512 tokens, 0 skipped, ..."``."""
        kept = self.rows_read - self.skipped
        what = self.kind
        if self.label_names is not None:
            what += f", {len(self.label_names)} labels: {', '.join(self.label_names)}"
        if self.packed:
            shape = (f"packed into {len(self.rows):,} blocks of {self.max_length:,} tokens "
                     f"({self.dropped_tokens:,} tail tokens dropped)")
        elif self.max_length is not None:
            shape = f"{self.truncated:,} truncated to {self.max_length:,} tokens"
        else:
            shape = "no length limit"
        return f"{kept:,} rows ({what}): {shape}, {self.skipped:,} skipped, {self.tokens:,} tokens"


class _BadRow(ValueError):
    """What is wrong with one row; :func:`encode_records` adds where it is and the fix."""


def encode_records(records: Iterable, tokenizer, *, kind: str = "auto", max_length: int | None = None,
                   packing: bool = False, skip_bad_rows: bool = False,
                   label_names: list[str] | None = None) -> EncodedData:
    """Validate and tokenize rows of one kind.

    Args:
        records: ``(where, row)`` pairs from :func:`peftlab.data.read_records`, or bare row dicts
            (then ``where`` is ``"row <index>"``).
        tokenizer: a ``transformers`` tokenizer; chat rows need its chat template, text and plain
            prompt/completion rows its eos token.
        kind: one of :data:`KINDS`, or ``"auto"``: the first good row's kind, which every other
            row must share. A row's kind is ``chat`` if it has ``messages``, ``prompt-completion``
            if it has ``prompt`` or ``completion``, ``classification`` if it has ``text`` and
            ``label``, ``text`` if it has ``text``; other keys are ignored.
        max_length: cut longer rows to this many tokens (from the right: a long prompt can leave
            nothing to learn), counting them in ``truncated``. Classification rows are cut by the
            tokenizer, which keeps its special tokens ([CLS] ... [SEP]).
        packing: language-modelling kinds only, needs ``max_length``. Concatenates all rows' ids
            and labels in order and cuts them into blocks of exactly ``max_length`` tokens; the
            tail shorter than a block is dropped (counted in ``dropped_tokens``). Rows are not
            truncated: they continue across block boundaries, and attention spans the rows
            sharing a block.
        skip_bad_rows: skip invalid rows (counted in ``skipped``) instead of raising.
        label_names: classification class names, index = class id. String labels must be among
            them; int labels must index them. Without it, string labels are numbered in sorted
            order and int labels are kept as they are.

    Tokenization: plain prompt/completion rows are ``tokenizer(prompt)`` (with the tokenizer's
    own special tokens, e.g. BOS) + ``tokenizer(completion)`` without special tokens + eos. Text
    rows are ``tokenizer(text)`` + eos (unless the tokenizer already ended them with it).
    Classification rows are ``tokenizer(text)["input_ids"]`` ([CLS] ... [SEP] for BERT).

    Raises:
        DataError: a bad row (unless skipped), every row bad, no rows, a tokenizer without the
            chat template or eos token the rows need, packing classification rows or without
            ``max_length``, ``label_names`` for a kind other than classification.
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"kind={kind!r}; use 'auto' or one of {', '.join(KINDS)}")
    if packing and max_length is None:
        raise DataError("packing needs max_length, the length of each packed block; pass max_length")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length={max_length}; it must be a positive number of tokens")

    encoded, classes, problems = [], [], []
    rows_read, truncated = 0, 0
    first = None  # (where, kind) of the first good row: the kind every row must have
    for index, record in enumerate(records):
        rows_read += 1
        where, row = record if isinstance(record, tuple) else (f"row {index}", record)
        try:
            if isinstance(row, DataError):  # a line read_records could not parse
                raise _BadRow(str(row).removeprefix(f"{where}: "))
            row_kind = kind if kind != "auto" else detect_kind(row)
            if first is not None and row_kind != first[1]:
                raise _BadRow(f"row kind {row_kind!r} differs from the first row's kind {first[1]!r} "
                              f"({first[0]}); one dataset holds one kind of row")
            if row_kind == "classification":
                if packing:
                    raise DataError("packing joins language-modelling rows; classification rows each "
                                    "keep their own label, so pass packing=False")
                ids, label = _encode_classification(row, tokenizer, classes, label_names)
                if max_length is not None and len(ids) > max_length:
                    truncated += 1
                    ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
                encoded.append({"input_ids": ids, "labels": label})
                classes.append(label)
            else:
                ids, labels = _ENCODERS[row_kind](row, tokenizer)
                if max_length is not None and not packing and len(ids) > max_length:
                    truncated += 1
                    ids, labels = ids[:max_length], labels[:max_length]
                encoded.append({"input_ids": ids, "labels": labels})
        except _BadRow as err:
            problem = f"{where}: {err}; {_FIX}"
            if not skip_bad_rows:
                raise DataError(problem) from None
            problems.append(problem)
            continue
        if first is None:
            first = (where, row_kind)

    if rows_read == 0:
        raise DataError("no rows to encode; the source is empty")
    if first is None:
        raise DataError(f"all {rows_read:,} rows are bad, the first: {problems[0]}")
    kind = first[1]
    if label_names is not None and kind != "classification":
        raise DataError(f"label_names applies to classification rows; these are {kind!r} rows, "
                        "so drop label_names")
    names = None
    if kind == "classification":
        names = _number_labels(encoded, label_names)
    dropped = 0
    if packing:
        encoded, dropped = _pack(encoded, max_length)
    return EncodedData(rows=encoded, kind=kind, label_names=names, rows_read=rows_read,
                       truncated=truncated, skipped=len(problems),
                       tokens=sum(len(r["input_ids"]) for r in encoded), max_length=max_length,
                       packed=packing, dropped_tokens=dropped)


def detect_kind(row) -> str:
    """The row format of one row: one of :data:`KINDS` (raises a row error when none fits)."""
    if not isinstance(row, dict):
        raise _BadRow(f"the row is {_type(row)}, not an object; each row is one of {FORMATS}")
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        return "prompt-completion"
    if "text" in row:
        return "classification" if "label" in row else "text"
    raise _BadRow(f"the row has keys {sorted(row)}, which match no format; rows are one of {FORMATS}")


def _field(row, key: str, kind: str):
    if not isinstance(row, dict):
        raise _BadRow(f"the row is {_type(row)}, not an object; {kind} rows look like {_EXAMPLES[kind]}")
    if key not in row:
        raise _BadRow(f"the row has no {key!r} (keys: {sorted(row)}); {kind} rows look like "
                      f"{_EXAMPLES[kind]}")
    return row[key]


def _text(row, key: str, kind: str) -> str:
    value = _field(row, key, kind)
    if not isinstance(value, str):
        raise _BadRow(f"{key!r} must be a string, got {_type(value)}")
    if not value.strip():
        raise _BadRow(f"{key!r} is empty")
    return value


def _messages(value, key: str) -> list[dict]:
    """Check a message list; returns copies without None-valued keys (Arrow fills a missing
    struct field with None, which chat templates would read as present)."""
    if not isinstance(value, list):
        hint = " (a CSV cell is text; write chat rows as JSON lines)" if isinstance(value, str) else ""
        raise _BadRow(f"{key!r} must be a list of {{role, content}} dicts, got {_type(value)}{hint}")
    if not value:
        raise _BadRow(f"{key!r} is an empty list; it needs {{role, content}} messages")
    messages = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise _BadRow(f"{key}[{j}] must be a {{role, content}} dict, got {_type(message)}")
        message = {k: v for k, v in message.items() if v is not None}
        for field in ("role", "content"):
            if field not in message:
                raise _BadRow(f"{key}[{j}] has no {field!r} (keys: {sorted(message)})")
        if message["role"] not in ROLES:
            raise _BadRow(f"{key}[{j}] has role {message['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise _BadRow(f"{key}[{j}]['content'] must be a string, got {_type(message['content'])}")
        messages.append(message)
    return messages


def _render(tokenizer, messages: list[dict], train_from: int, key: str) -> tuple[list[int], list[int]]:
    require_chat_template(tokenizer)  # before looking at the row: without one, no row can pass
    if not any(m["role"] == "assistant" for m in messages[train_from:]):
        raise _BadRow(f"{key!r} has no assistant message, so there is nothing to learn; add one")
    try:
        return render_chat(tokenizer, messages, train_from=train_from)
    except DataError:
        raise  # about the tokenizer, not the row
    except ValueError as err:
        raise _BadRow(str(err)) from err


def _encode_chat(row, tokenizer) -> tuple[list[int], list[int]]:
    return _render(tokenizer, _messages(_field(row, "messages", "chat"), "messages"), 0, "messages")


def _encode_prompt_completion(row, tokenizer) -> tuple[list[int], list[int]]:
    prompt = _field(row, "prompt", "prompt-completion")
    completion = _field(row, "completion", "prompt-completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational
        prompt = _messages(prompt, "prompt")
        return _render(tokenizer, prompt + _messages(completion, "completion"), len(prompt), "completion")
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        raise _BadRow(f"'prompt' and 'completion' must both be strings or both message lists, got "
                      f"{_type(prompt)} and {_type(completion)}")
    completion = _text(row, "completion", "prompt-completion")
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [_eos(tokenizer)]
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def _encode_text(row, tokenizer) -> tuple[list[int], list[int]]:
    ids = tokenizer(_text(row, "text", "text"))["input_ids"]
    if ids[-1:] != [_eos(tokenizer)]:
        ids = ids + [_eos(tokenizer)]
    return ids, list(ids)


_ENCODERS = {"chat": _encode_chat, "prompt-completion": _encode_prompt_completion, "text": _encode_text}
_EXAMPLES = {
    "chat": '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}',
    "prompt-completion": '{"prompt": ..., "completion": ...}',
    "text": '{"text": ...}',
    "classification": '{"text": ..., "label": ...}',
}


def _encode_classification(row, tokenizer, seen: list, label_names: list[str] | None) -> tuple[list[int], str | int]:
    """Ids of the text and the row's label, checked against ``label_names`` or, without them,
    against the type of the labels seen so far (strings and ints do not mix)."""
    text = _text(row, "text", "classification")
    label = _field(row, "label", "classification")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise _BadRow(f"'label' must be a class name (string) or index (int), got {_type(label)}")
    if isinstance(label, str) and not label.strip():
        raise _BadRow("'label' is empty")
    if isinstance(label, int) and label < 0:
        raise _BadRow(f"'label' is {label}; class indices start at 0")
    if label_names is not None:
        if isinstance(label, str) and label not in label_names:
            raise _BadRow(f"label {label!r} is not one of label_names {label_names}")
        if isinstance(label, int) and label >= len(label_names):
            raise _BadRow(f"label {label} is out of range for the {len(label_names)} label_names "
                          f"{label_names}")
    elif seen and isinstance(seen[0], str) != isinstance(label, str):
        raise _BadRow(f"label {label!r} is {_type(label)} but the first row's label {seen[0]!r} is "
                      f"{_type(seen[0])}; use names or indices throughout")
    return tokenizer(text)["input_ids"], label


def _number_labels(rows: list[dict], label_names: list[str] | None) -> list[str]:
    """Replace string labels by their index in place; returns index → name."""
    labels = [r["labels"] for r in rows]
    if label_names is None:
        if isinstance(labels[0], int):
            return [str(i) for i in range(max(labels) + 1)]
        label_names = sorted(set(labels))
    index = {name: i for i, name in enumerate(label_names)}
    for r in rows:
        if isinstance(r["labels"], str):
            r["labels"] = index[r["labels"]]
    return list(label_names)


def _pack(rows: list[dict], block: int) -> tuple[list[dict], int]:
    """Blocks of exactly ``block`` tokens from the rows' concatenation, and the dropped tail."""
    ids = [t for r in rows for t in r["input_ids"]]
    labels = [t for r in rows for t in r["labels"]]
    usable = len(ids) - len(ids) % block
    if usable == 0:
        raise DataError(f"the {len(rows):,} rows hold {len(ids):,} tokens, less than one packed block "
                        f"of max_length={block}; lower max_length or turn packing off")
    blocks = [{"input_ids": ids[i:i + block], "labels": labels[i:i + block]} for i in range(0, usable, block)]
    return blocks, len(ids) - usable


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"tokenizer {name} has no eos token to end text and completion rows with; "
                        "set tokenizer.eos_token")
    return tokenizer.eos_token_id


def _type(value) -> str:
    return "None" if value is None else type(value).__name__
