"""Checkpoints: a round trip restores tensors, optimizer and RNG; writes are atomic; old ones are pruned."""

import json
import random

import numpy as np
import pytest
import torch

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.models import tiny
from peftlab.train import CheckpointError, latest_checkpoint
from peftlab.train import checkpoint as ckpt
from peftlab.train.checkpoint import load_checkpoint, save_checkpoint, trainable_tensors

from .common import collate, counting_rows, lora_llama


def trained(seed=0, steps=2):
    """A LoRA llama and its AdamW after ``steps`` steps (so the optimizer has state)."""
    model = lora_llama(seed)
    optimizer = torch.optim.AdamW(trainable_tensors(model).values(), lr=1e-2)
    for i in range(steps):
        model(**collate(counting_rows(4, seed=i))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_round_trip_restores_tensors_optimizer_and_rng(tmp_path):
    model, optimizer = trained(seed=0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, trainer_state={"note": "x"})
    expected = draws()

    other, other_opt = trained(seed=1, steps=1)  # different tensors, different optimizer state
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    state = load_checkpoint(path, model=other, optimizer=other_opt)

    assert state["note"] == "x" and state["step"] == 2
    got = draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    for key, t in trainable_tensors(model).items():
        assert torch.equal(trainable_tensors(other)[key], t), key
    saved, loaded = optimizer.state_dict()["state"], other_opt.state_dict()["state"]
    assert set(saved) == set(loaded) and len(saved) == len(trainable_tensors(model))
    for i in saved:
        assert float(loaded[i]["step"]) == float(saved[i]["step"]) == 2.0
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[i][name], saved[i][name])
    # The checkpoint's adapter/ is an ordinary adapter directory.
    loaded_model = PeftModel.from_pretrained(tiny("llama", "causal-lm", seed=0), path / "adapter")
    for key, t in model.adapter_state_dict().items():
        assert torch.equal(loaded_model.adapter_state_dict()[key], t)
    # Nothing in it is a pickle: the state is JSON, the tensors safetensors.
    json.loads((path / "trainer_state.json").read_text())
    assert sorted(p.name for p in path.iterdir()) == ["adapter", "optimizer.safetensors", "trainable.safetensors",
                                                     "trainer_state.json"]


def test_latest_ignores_incomplete_dirs_and_old_ones_are_pruned(tmp_path):
    model, optimizer = trained(steps=1)
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, trainer_state={}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000006"]
    (root / ".step-000008.abc.tmp").mkdir()  # a process killed while writing step 8
    (root / "step-000010").mkdir()  # not complete: no trainer_state.json
    assert latest_checkpoint(tmp_path).name == "step-000006"
    save_checkpoint(tmp_path, 8, model=model, optimizer=optimizer, trainer_state={}, keep=2)
    assert not list(root.glob(".*.tmp")), "leftover temp dirs are cleared by the next save"
    with pytest.raises(FileExistsError, match="step-000008 already exists"):
        save_checkpoint(tmp_path, 8, model=model, optimizer=optimizer, trainer_state={})


def test_a_failed_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    model, optimizer = trained(steps=1)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_flatten_optimizer", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, trainer_state={})
    assert list((tmp_path / "checkpoints").iterdir()) == [] and latest_checkpoint(tmp_path) is None


def test_loading_into_another_adapter_layout_is_refused(tmp_path):
    model, optimizer = trained(steps=1)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, trainer_state={})
    other = get_peft_model(tiny("llama", "causal-lm"), LoraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match="does not fit this model: .* missing .*same base model, adapters"):
        load_checkpoint(path, model=other, optimizer=torch.optim.AdamW(trainable_tensors(other).values()))
