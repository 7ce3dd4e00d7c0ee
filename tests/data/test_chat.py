import torch

from peftlab.data.chat import IGNORE, collate, encode_chat, iterate_batches
from tests.helpers import chat_tokenizer


def test_completion_only_labels():
    tok = chat_tokenizer("hello there general kenobi".split())
    row = encode_chat(tok, "hello there", "general kenobi")
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|> user hello there <|im_end|>")
    supervised = [t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE]
    assert tok.decode(supervised) == "general kenobi <|im_end|>"  # the answer and its end-of-turn, nothing else
    assert all(l == IGNORE for l in row["labels"][: len(row["labels"]) - len(supervised)])


def test_truncation():
    tok = chat_tokenizer("a b c".split())
    row = encode_chat(tok, "a b c a b c", "a b", max_length=5)
    assert len(row["input_ids"]) == len(row["labels"]) == 5


def test_collate_pads_both_sides():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(rows, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = collate(rows, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"][1].tolist() == [0, 0, 1]


def test_iterate_batches_covers_each_epoch_once():
    rows = [{"input_ids": [i]} for i in range(10)]
    it = iterate_batches(rows, batch_size=5, pad_id=0, seed=1)
    epoch = torch.cat([next(it)["input_ids"].flatten() for _ in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))
