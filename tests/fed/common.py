"""Shared pieces of the federated tests: a tiny BERT classifier task and learnable rows."""

import random
from functools import partial

from peftlab import LoraConfig
from peftlab.fed.task import FedTask
from peftlab.models import tiny
from peftlab.train import TrainArgs

LABELS = 3


def rows(n, seed):
    """A learnable rule: the label is which of the tokens 3, 4, 5 appears among random tokens."""
    g = random.Random(seed)
    out = []
    for _ in range(n):
        label = g.randrange(LABELS)
        ids = [g.randrange(10, 100) for _ in range(6)]
        ids[g.randrange(6)] = 3 + label
        out.append({"input_ids": ids, "labels": label})
    return out


def bert_task(aggregation="fedavg", steps=3, adapter=None):
    adapter = adapter or LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    return FedTask(build_base=partial(tiny, "bert", "seq-cls", num_labels=LABELS, seed=0), adapter=adapter,
                   local=TrainArgs(steps=steps, batch_size=4, lr=1e-2, progress=False), aggregation=aggregation)
