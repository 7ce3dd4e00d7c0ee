"""quantize_model, memory_report and load(..., quantize=...)."""

import pytest
import torch
import torch.nn as nn

from peftlab import LoraConfig, get_peft_model
from peftlab.models import load, tiny
from peftlab.quant import QuantLinear, memory_report, quantize_model
from tests.helpers import chat_tokenizer

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_replaces_the_linear_layers_but_not_the_head_or_embeddings():
    model = quantize_model(tiny("llama", "causal-lm", seed=0), "nf4")
    quantized = {p for p, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {f"model.layers.{i}.{kind}.{p}" for i in range(2) for p in PROJ
                         for kind in ("self_attn" if p.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp",)}
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding

    model = quantize_model(tiny("llama", "causal-lm", seed=0), "int8", skip=("lm_head", "down_proj"))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 12
    assert all(m.scheme == "int8" for m in model.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize("scheme, max_logit_error", [("int8", 0.02), ("nf4", 0.3)])
def test_quantized_model_stays_close_to_the_original(scheme, max_logit_error):
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = tiny("llama", "causal-lm", seed=0)(input_ids=ids).logits
        quant = quantize_model(tiny("llama", "causal-lm", seed=0), scheme)(input_ids=ids).logits
    error = (quant - dense).abs().max().item()
    assert 0 < error < max_logit_error


def test_memory_of_a_realistic_stack_nf4_under_a_fifth_of_fp32():
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Linear(*shape, bias=False) for shape in [(576, 1536), (1536, 576)] * 2])
    n = 576 * 1536
    int8 = memory_report(quantize_model(nn.Sequential(*[nn.Linear(576, 1536, bias=False)]), "int8"))
    assert int8["ratio"] == pytest.approx((n + 4 * 1536) / (4 * n))  # 8 bits + one fp32 scale per row
    report = memory_report(quantize_model(stack, "nf4"))
    assert report["quantized_layers"] == 4 and report["fp32_bytes"] == 4 * 4 * n
    # NF4 with double quantisation: 4 + 8/64 + 32/(64·256) bits, plus a mean and 16 levels per layer
    assert report["bits_per_param"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert report["ratio"] == pytest.approx(0.129, abs=1e-3) and report["ratio"] <= 0.2
    assert report["model_bytes"] == report["quantized_bytes"]  # nothing else in the stack


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="quantize the base model first, then call get_peft_model"):
        quantize_model(get_peft_model(tiny("llama", "causal-lm"), LoraConfig(target_modules=["q_proj"])))
    with pytest.raises(ValueError, match=r"backend='bitsandbytes' needs .* weights on CUDA \(got cpu\)"):
        quantize_model(tiny("llama", "causal-lm"), backend="bitsandbytes")
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize_model(tiny("llama", "causal-lm"), backend="cuda")
    with pytest.raises(ValueError, match="unknown quantisation scheme 'nf8'"):
        quantize_model(tiny("llama", "causal-lm"), "nf8")


def test_load_quantizes_a_model_directory(tmp_path):
    tiny("llama", "causal-lm", seed=0).save_pretrained(tmp_path)
    chat_tokenizer(["a", "b"]).save_pretrained(tmp_path)
    model, _ = load(str(tmp_path), quantize="nf4")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    with pytest.raises(ValueError, match=r"quantize='fp4' is not a scheme; use one of \('nf4', 'int8'\)"):
        load(str(tmp_path), quantize="fp4")
