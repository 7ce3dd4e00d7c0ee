"""LoRA against its closed form: h = W x + s · B A x, ΔW = s · B A, s = alpha/r (or alpha/√r)."""

import math

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peftlab import ConfigError, LoraConfig, get_peft_model


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.lin = nn.Linear(6, 5)
        self.conv = Conv1D(4, 5)  # GPT-2 layout: weight (in=5, out=4)

    def forward(self, input_ids):
        return self.conv(self.lin(self.emb(input_ids)))


def lora_tensors(model, path):
    state = model.adapter_state_dict()
    a = state.get(f"{path}.lora_A.weight", state.get(f"{path}.lora_embedding_A"))
    b = state.get(f"{path}.lora_B.weight", state.get(f"{path}.lora_embedding_B"))
    return a, b


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_delta_match_closed_form(use_rslora):
    toy = Toy()
    emb_w, lin_w, lin_b, conv_w, conv_b = (t.detach().clone() for t in
                                          (toy.emb.weight, toy.lin.weight, toy.lin.bias, toy.conv.weight, toy.conv.bias))
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["emb", "lin", "conv"], init_lora_weights=False,
                     use_rslora=use_rslora)
    model = get_peft_model(toy, cfg)
    s = 5 / (math.sqrt(3) if use_rslora else 3)
    (Ae, Be), (Al, Bl), (Ac, Bc) = (lora_tensors(model, p) for p in ("emb", "lin", "conv"))
    assert Ae.shape == (3, 20) and Be.shape == (6, 3) and Al.shape == (3, 6) and Bl.shape == (5, 3)
    assert Ac.shape == (3, 5) and Bc.shape == (4, 3)

    ids = torch.tensor([[1, 4, 0, 7], [3, 3, 9, 19]])
    with torch.no_grad():
        e = emb_w[ids] + s * (Be @ Ae[:, ids].permute(1, 2, 0).unsqueeze(-1)).squeeze(-1)
        h = e @ lin_w.T + lin_b + s * e @ Al.T @ Bl.T
        expected = h @ conv_w + conv_b + s * h @ Ac.T @ Bc.T
        torch.testing.assert_close(model(input_ids=ids), expected, atol=1e-5, rtol=1e-5)

        layers = dict(model.adapter_layers())
        torch.testing.assert_close(layers["lin"].delta_weight("default"), s * Bl @ Al)
        torch.testing.assert_close(layers["conv"].delta_weight("default"), (s * Bc @ Ac).T)  # Conv1D is (in, out)
        torch.testing.assert_close(layers["emb"].delta_weight("default"), (s * Be @ Ae).T)  # Embedding is (V, dim)


def test_default_init_is_kaiming_a_and_zero_b():
    model = get_peft_model(Toy(), LoraConfig(r=4, target_modules=["lin"]))
    a, b = lora_tensors(model, "lin")
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) == a.numel()
    bound = 1 / math.sqrt(6)  # kaiming_uniform(a=√5) on fan_in 6 gives U(-1/√fan_in, 1/√fan_in)
    assert a.abs().max() <= bound


def test_gaussian_init_std():
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(4000, 4))
    model = get_peft_model(big, LoraConfig(r=8, target_modules=["0"], init_lora_weights="gaussian"))
    a = model.adapter_state_dict()["0.lora_A.weight"]
    assert abs(a.std().item() - 1 / 8) < 0.005


def test_mixed_ranks_in_one_batch():
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=7, lora_alpha=3, target_modules=["lin", "conv"], init_lora_weights=False))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["b", "a", "b"])
        model.set_adapter("a")
        only_a = model(input_ids=ids)
        model.set_adapter("b")
        only_b = model(input_ids=ids)
    torch.testing.assert_close(mixed[[0, 2]], only_b[[0, 2]], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[1], only_a[1], atol=1e-6, rtol=1e-5)


def test_stacked_active_adapters_add_up():
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=3, target_modules=["lin"], init_lora_weights=False))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        outs = {}
        for names in (["a"], ["b"], ["a", "b"]):
            model.set_adapter(names)
            outs[tuple(names)] = model.lin(model.emb(ids))
        with model.disable_adapter():
            base = model.lin(model.emb(ids))
    torch.testing.assert_close(outs[("a", "b")] - base, (outs[("a",)] - base) + (outs[("b",)] - base))


def test_dropout_only_on_adapter_branch_and_only_in_training():
    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=4, target_modules=["lin"], lora_dropout=0.5, init_lora_weights=False))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids=ids), model(input_ids=ids))
        model.train()
        a, b = model(input_ids=ids), model(input_ids=ids)
        assert not torch.equal(a, b)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids), model(input_ids=ids))


@pytest.mark.parametrize("field,value,match", [
    ("r", 0, "r must be a positive int"),
    ("r", -2, "r must be a positive int"),
    ("lora_alpha", 0, "lora_alpha must be > 0"),
    ("lora_alpha", -1.0, "lora_alpha must be > 0"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
    ("lora_dropout", -0.1, r"lora_dropout must be in \[0, 1\)"),
    ("bias", "all", "bias='all' is not supported"),
    ("init_lora_weights", "pissa", "init_lora_weights must be"),
    ("target_modules", "(unclosed", "not a valid regular expression"),
])
def test_invalid_config_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**{field: value})
