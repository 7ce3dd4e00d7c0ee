"""bitsandbytes' NF4 layer as the frozen base (``quantize_model(..., backend="bitsandbytes")``).

bitsandbytes' ``Linear4bit`` runs on CPU too, so these run in every test run; where a GPU is
present they run on CUDA as well (the backend ``quantize_model`` picks there by default). Oracles:
the layer's output is x·Wᵀ + b of its own dequantised weight; without double quantisation that
weight equals peftlab's pure-PyTorch NF4 (same blocks, levels and rounding); Hugging Face PEFT's
LoRA on the same bitsandbytes layers gives the same logits.
"""

import copy
import logging
import re

import pytest
import torch

from peftlab import BottleneckConfig, IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from peftlab.models import tiny
from peftlab.quant import QuantLinear, quantize_model
from tests.quant.test_adapters import check_merge_round_trip, train_on_counting

bnb = pytest.importorskip("bitsandbytes")
from peftlab.quant.bnb import _layer_class  # noqa: E402  (needs bitsandbytes)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IDS = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def bnb_llama(device, dtype=torch.float32, **options):
    model = tiny("llama", "causal-lm", seed=0).to(device=device, dtype=dtype)
    return quantize_model(model, "nf4", backend="bitsandbytes", **options)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS.to(model.device)).logits.float()


def packed(model):
    """Every bitsandbytes layer's packed codes (a copy)."""
    return {p: m.weight.data.clone() for p, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("device", DEVICES)
def test_layers_compute_with_their_dequantised_weight_and_match_peftlab_nf4(device):
    dense = tiny("llama", "causal-lm", seed=0).to(device)
    model = quantize_model(copy.deepcopy(dense), "nf4", backend="bitsandbytes", double_quant=False)
    ours = quantize_model(copy.deepcopy(dense), "nf4", backend="torch", double_quant=False)
    layers = {p: m for p, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(layers) == {p for p, m in ours.named_modules() if isinstance(m, QuantLinear)} and len(layers) == 14
    x = torch.randn(5, 64, device=device)
    for path, layer in layers.items():
        assert isinstance(layer, _layer_class()) and layer.weight.dtype == torch.uint8
        weight = layer.dense_weight()
        # The same NF4 blocks, levels and rounding as peftlab's own NF4.
        torch.testing.assert_close(weight, ours.get_submodule(path).weight, atol=1e-6, rtol=0)
        original = dense.get_submodule(path).weight
        absmax = original.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        assert ((weight - original).reshape(-1, 64).abs() <= 0.16 * absmax).all()  # half the widest level gap (0.152)
        xi = x[:, : layer.in_features].contiguous()
        torch.testing.assert_close(layer(xi), xi @ weight.T, atol=1e-5, rtol=1e-5)
    # auto picks bitsandbytes on CUDA only; the CPU keeps peftlab's own layer.
    auto = quantize_model(copy.deepcopy(dense), "nf4")
    expected = _layer_class() if device == "cuda" else QuantLinear
    assert type(auto.model.layers[0].self_attn.q_proj) is expected


@pytest.mark.parametrize("device", DEVICES)
def test_lora_learns_on_a_bitsandbytes_base_and_the_codes_do_not_change(device):
    torch.manual_seed(0)
    model = get_peft_model(bnb_llama(device), LoraConfig(r=8, lora_alpha=16, target_modules=r".*(_proj|lm_head)"))
    codes = packed(model)
    losses = train_on_counting(model, device)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    assert all(torch.equal(t, codes[p]) for p, t in packed(model).items())


CONFIGS = [
    LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=True),
    LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False),
    IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["lora", "dora", "loha", "ia3"])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_dequantises_unmerge_restores_and_requantize_states_its_error(config, device, caplog):
    model = get_peft_model(bnb_llama(device), config)
    _, quantized = check_merge_round_trip(model, logits)

    dense = copy.deepcopy(model).merge_and_unload()  # W_dequantised + ΔW
    with caplog.at_level(logging.INFO, logger="peftlab.model"):
        merged = model.merge_and_unload(requantize=True)
    logged = float(re.search(r"largest absolute weight change (\S+)", caplog.text)[1])
    errors = [(merged.get_submodule(p).dense_weight() - dense.get_submodule(p).weight).abs().max().item()
              for p in quantized]
    assert all(isinstance(merged.get_submodule(p), _layer_class()) for p in quantized)
    assert logged == pytest.approx(max(errors), rel=1e-3) and logged > 0  # logged to 4 digits


@pytest.mark.parametrize("device", DEVICES)
def test_adapters_take_the_compute_dtype_and_load_onto_a_fresh_base(device, tmp_path):
    # A bf16 model: the packed codes say uint8; the adapters are fp32 (autocast_adapter_dtype, the
    # default, as in PEFT), or bf16 — the compute dtype — without it. Never uint8.
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(bnb_llama(device, torch.bfloat16), config)
    assert {t.dtype for t in model.adapter_state_dict().values()} == {torch.float32}
    half = get_peft_model(bnb_llama(device, torch.bfloat16), config, autocast_adapter_dtype=False)
    assert {t.dtype for t in half.adapter_state_dict().values()} == {torch.bfloat16}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(bnb_llama(device, torch.bfloat16), tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        block = get_peft_model(bnb_llama(device, torch.bfloat16), BottleneckConfig(variant="pfeiffer", bottleneck=4),
                               autocast_adapter_dtype=autocast)
        assert {t.dtype for t in block.adapter_state_dict().values()} == {dtype}
        assert torch.isfinite(logits(block)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_hugging_face_peft_loads_our_adapter_onto_its_bitsandbytes_lora_with_the_same_logits(device, tmp_path):
    peft = pytest.importorskip("peft")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    ours = get_peft_model(bnb_llama(device), config)
    ours.save_pretrained(tmp_path, format="peft")
    base = bnb_llama(device)
    base.is_loaded_in_4bit = True  # how PEFT recognises bitsandbytes layers to wrap
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    wrapped = [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.bnb.Linear4bit)]
    assert len(wrapped) == 4 * 2  # PEFT's own 4-bit LoRA layer on each target of both blocks
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_quantizing_on_the_way_to_a_device_gives_what_quantizing_there_gives(device):
    # quantize_model(device=...) moves each layer just before quantising it: a dense model on the
    # CPU reaches the device already quantised, and "auto" picks the device's backend.
    moved = quantize_model(tiny("llama", "causal-lm", seed=0), "nf4", device=device)
    there = quantize_model(tiny("llama", "causal-lm", seed=0).to(device), "nf4")
    assert {p.device.type for p in moved.parameters()} == {torch.device(device).type}
    layers = [(p, m) for p, m in there.named_modules() if hasattr(m, "quantized_nbytes")]
    assert len(layers) == 14
    for path, layer in layers:
        other = moved.get_submodule(path)
        assert type(other) is type(layer)
        torch.testing.assert_close(other.dequantize().weight, layer.dequantize().weight, atol=0, rtol=0)
    torch.testing.assert_close(logits(moved), logits(there), atol=0, rtol=0)
