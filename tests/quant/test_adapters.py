"""Adapters on a quantised base: LoRA learns on NF4, gradients reach only the adapter (and the
input), merging dequantises (W + ΔW, equal to the unmerged model), unmerging restores the quantised
layer exactly, re-quantising reports its error, and adapters save and load on a quantised base."""

import copy
import logging
import re

import pytest
import torch
import torch.nn as nn

from peftlab import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from peftlab.models import tiny
from peftlab.quant import QuantLinear, quantize_model

IDS = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def nf4_llama(scheme="nf4"):
    return quantize_model(tiny("llama", "causal-lm", seed=0), scheme)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def counting_batches(seed=0):
    # As in tests/train/test_loop.py: every sequence counts up by one modulo 50 from a random start.
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(3, 50, (8, 1), generator=g)
        ids = 3 + (start + torch.arange(12)) % 50
        yield {"input_ids": ids, "labels": ids}


def train_on_counting(model, device="cpu", steps=25) -> list[float]:
    """AdamW on the counting task; asserts every step that gradients reach the adapter alone.
    Returns the losses."""
    adapter = {id(t) for t in model.adapter_state_dict().values()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _, batch in zip(range(steps), counting_batches()):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        assert {id(p) for p in model.parameters() if p.grad is not None} == adapter
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_on_an_nf4_base_learns_and_only_the_adapter_changes():
    torch.manual_seed(0)
    # lm_head stays dense (not quantised) and is adapted too: the tiny model's random head is flat.
    model = get_peft_model(nf4_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=r".*(_proj|lm_head)"))
    codes = {p: m.codes.clone() for p, m in model.named_modules() if isinstance(m, QuantLinear)}
    losses = train_on_counting(model)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.35 * first, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    assert all(torch.equal(m.codes, codes[p]) for p, m in model.named_modules() if isinstance(m, QuantLinear))


def test_gradients_reach_the_input_and_lora_only():
    model = get_peft_model(nn.Sequential(QuantLinear.from_linear(nn.Linear(70, 40), "nf4")),
                           LoraConfig(target_modules=["0"], init_lora_weights=False))
    x = torch.randn(3, 70, requires_grad=True)
    model(x).sum().backward()
    layer = dict(model.adapter_layers())["0"]
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in (layer.lora_A["default"], layer.lora_B["default"]))
    assert layer.base_layer.bias.grad is None


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        torch.manual_seed(0)
        model = get_peft_model(nf4_llama(), LoraConfig(target_modules=["q_proj", "down_proj"], init_lora_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {k: t.grad for k, t in model.adapter_state_dict().items()}

    plain, checkpointed = grads(False), grads(True)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key])


def check_merge_round_trip(model, logits_of=None):
    """merge_adapter swaps dense copies in and keeps the logits; unmerge_adapter puts the very same
    quantised layers back. Returns the logits and {path: quantised layer}."""
    logits_of = logits_of or logits
    expected = logits_of(model)
    quantized = {p: layer.base_layer for p, layer in model.adapter_layers()}
    model.merge_adapter()
    assert all(type(layer.base_layer) is nn.Linear for _, layer in model.adapter_layers())
    torch.testing.assert_close(logits_of(model), expected, atol=1e-4, rtol=0)
    model.unmerge_adapter()  # the quantised layers come back untouched: same objects, same codes
    assert all(layer.base_layer is quantized[p] and layer.quantized_base is None for p, layer in model.adapter_layers())
    torch.testing.assert_close(logits_of(model), expected, atol=1e-6, rtol=0)
    return expected, quantized


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False),
    IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
], ids=["lora", "loha", "ia3"])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merge_dequantises_and_matches_the_adapter_model(config, scheme):
    model = get_peft_model(nf4_llama(scheme), config)
    expected, quantized = check_merge_round_trip(model)

    merged = model.merge_and_unload()
    assert all(type(merged.get_submodule(p)) is nn.Linear for p in quantized)
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)


def test_requantize_after_merge_logs_the_error_it_causes(caplog):
    config = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(nf4_llama(), config)
    paths = model.adapter_paths("default")
    dense = copy.deepcopy(model).merge_and_unload()  # W_dequantised + ΔW, in fp32
    requantized = {p: QuantLinear.from_linear(dense.get_submodule(p), "nf4") for p in paths}
    expected = max((requantized[p].weight - dense.get_submodule(p).weight).abs().max().item() for p in paths)
    largest = max(dense.get_submodule(p).weight.abs().max().item() for p in paths)

    with caplog.at_level(logging.INFO, logger="peftlab.model"):
        merged = model.merge_and_unload(requantize=True)
    logged = float(re.search(r"re-quantised 4 merged layer\(s\); largest absolute weight change (\S+)", caplog.text)[1])
    assert logged == pytest.approx(expected, rel=1e-3)
    assert 0 < logged <= 0.16 * largest  # NF4: half the widest level gap (0.152) times the block absmax
    for p in paths:
        assert isinstance(merged.get_submodule(p), QuantLinear)
        assert torch.equal(merged.get_submodule(p).codes, requantized[p].codes)


def test_adapter_saved_on_a_quantised_base_loads_onto_a_fresh_one(tmp_path):
    model = get_peft_model(nf4_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(nf4_llama(), tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_bottleneck_adapter_on_a_quantised_mlp_block_and_parameter_counts():
    # A quantised MLP block holds only buffers: the adapter takes device and dtype from them, and
    # the model's total still counts the quantised weights.
    from peftlab import BottleneckConfig, get_peft_model
    from peftlab.models import tiny
    from peftlab.quant import quantize_model

    dense_total = sum(p.numel() for p in tiny("llama", "causal-lm").parameters())
    model = quantize_model(tiny("llama", "causal-lm"), "nf4")
    peft_model = get_peft_model(model, BottleneckConfig(variant="pfeiffer", bottleneck=4))
    trainable, total = peft_model.trainable_parameters()
    assert trainable == sum(t.numel() for t in peft_model.adapter_state_dict("default").values())
    assert total == dense_total + trainable
    ids = torch.randint(3, 100, (2, 6))
    assert torch.isfinite(peft_model(input_ids=ids).logits).all()
