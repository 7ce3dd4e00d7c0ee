"""Evaluation: token-weighted LM loss and classification accuracy against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from peftlab import LoraConfig, get_peft_model
from peftlab.data import IGNORE
from peftlab.models import tiny
from peftlab.train import evaluate

from .common import collate, lora_llama


def test_lm_loss_is_weighted_by_label_tokens():
    model = lora_llama().eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in ((5, 2), (9, 6), (7, 0), (4, 3), (11, 1)):  # different label counts per row
        ids = torch.randint(3, 100, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:  # one row at a time, no padding: position t predicts label t + 1
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(r["labels"][1:])
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            count += int((labels != IGNORE).sum())
    for batch_size in (2, 3):
        got = evaluate(model, rows, collate, batch_size=batch_size)
        assert got["eval_loss"] == pytest.approx(total / count, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert evaluate(model, rows, collate, batch_size=2, max_batches=1)["eval_loss"] != pytest.approx(total / count)


def test_classification_accuracy_equals_a_hand_count():
    torch.manual_seed(0)
    model = get_peft_model(tiny("bert", "seq-cls", num_labels=3, seed=0),
                           LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 100, (n,), generator=g).tolist()} for n in (5, 7, 6, 8, 5, 9, 4, 6, 7, 5)]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
    predicted = [int(x.argmax()) for x in logits]
    for i, r in enumerate(rows):  # 7 of 10 labels agree with the prediction, 3 do not
        r["labels"] = predicted[i] if i < 7 else (predicted[i] + 1) % 3
    expected_loss = sum(F.cross_entropy(x, torch.tensor(r["labels"])).item() for x, r in zip(logits, rows)) / len(rows)
    got = evaluate(model, rows, collate, batch_size=4)
    assert got["accuracy"] == 0.7
    assert got["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert "perplexity" not in got
