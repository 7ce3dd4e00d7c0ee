"""Adapter weights on a half-precision base: fp32 by default (``autocast_adapter_dtype``, as in
Hugging Face PEFT), so the optimizer's small updates are not rounded away; the base's dtype with
``autocast_adapter_dtype=False``. Every method trains and serves mixed batches either way."""

import pytest
import torch

from peftlab import BASE, LoraConfig, PeftModel, get_peft_model
from peftlab.layers import ModulesToSaveLayer
from peftlab.models import tiny
from tests.conftest import make_inputs, output_of
from tests.methods.cases import CASES

TASK = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "seq-cls", "t5": "seq2seq"}


def module_copies(model, name):
    """Keys of tensors that belong to whole-module copies (they keep the module's dtype)."""
    return {f"{path}.{key}" for path, layer in model.adapter_layers(name) if isinstance(layer, ModulesToSaveLayer)
            for key in layer.adapter_state(name)}


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("autocast", [True, False])
def test_every_method_on_a_bf16_base_trains_in_the_adapters_dtype(method, autocast):
    case = CASES[method]
    arch = "llama" if "llama" in case.archs else case.archs[0]
    torch.manual_seed(0)
    model = get_peft_model(tiny(arch, TASK[arch], seed=0).to(torch.bfloat16), case.make(arch, 0), adapter_name="a",
                           autocast_adapter_dtype=autocast)
    model.add_adapter("b", case.make(arch, 1), autocast_adapter_dtype=autocast)
    want = torch.float32 if autocast else torch.bfloat16
    for name in ("a", "b"):
        copies = module_copies(model, name)
        dtypes = {k: t.dtype for k, t in model.adapter_state_dict(name).items()}
        assert {d for k, d in dtypes.items() if k not in copies} == {want}, dtypes
        assert {d for k, d in dtypes.items() if k in copies} <= {torch.bfloat16}
    inputs = make_inputs(arch)
    extra = case.extra_inputs(inputs["input_ids"].shape[0]) if case.extra_inputs else {}
    model.train()
    out = output_of(model(**inputs, **extra), inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().pow(2).sum().backward()
    grads = {k: t.grad for k, t in model.adapter_state_dict("a").items() if t.requires_grad}
    assert grads and all(g is not None and g.dtype == t.dtype for g, t in
                         zip(grads.values(), (model.adapter_state_dict("a")[k] for k in grads)))
    with torch.no_grad():  # mixed rows over fp32 (or bf16) adapters on the bf16 base
        mixed = output_of(model(**inputs, **extra, adapter_names=["a", BASE, "b"]), inputs)
        alone = output_of(model(**inputs, **extra), inputs)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[0], alone[0], atol=2e-2, rtol=2e-2)  # row 0 is adapter "a" both times


def test_fp32_adapters_keep_the_small_updates_bf16_adapters_round_away():
    """AdamW's first step (no weight decay) moves each weight by lr·|g| / (|g| + eps), about lr. At
    lr 1e-4 that is below half of bf16's spacing for |w| ≥ 2⁻⁵ (2⁻¹² / 2 ≈ 1.2e-4): fp32 adapters
    take it, bf16 ones round it away."""
    lr, eps = 1e-4, 1e-8
    moved, grads = {}, {}
    for autocast in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(tiny("llama", "causal-lm", seed=0).to(torch.bfloat16),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                               autocast_adapter_dtype=autocast)
        A = model.adapter_state_dict()["model.layers.0.self_attn.q_proj.lora_A.weight"]
        before = A.detach().float().clone()
        model.train()
        model(input_ids=make_inputs("llama")["input_ids"]).logits.float().pow(2).mean().backward()
        grads[autocast] = A.grad.detach().float().abs()
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps, weight_decay=0.0).step()
        moved[autocast] = (A.detach().float() - before).abs()
        large = before.abs() >= 2 ** -5
    assert grads[True].dtype == torch.float32 and grads[True].min() > 0
    # fp32: every weight moved by Adam's closed-form first step ...
    torch.testing.assert_close(moved[True], lr * grads[True] / (grads[True] + eps), rtol=1e-3, atol=0)
    # ... bf16: rounded away wherever the spacing is too coarse (most of A at this init).
    assert large.float().mean() > 0.5 and (moved[False][large] == 0).all()


def test_saved_fp32_adapters_load_onto_a_bf16_base_as_fp32(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny("llama", "causal-lm", seed=0).to(torch.bfloat16),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny("llama", "causal-lm", seed=0).to(torch.bfloat16), tmp_path)
    for key, t in model.adapter_state_dict().items():
        assert loaded.adapter_state_dict()[key].dtype == torch.float32
        torch.testing.assert_close(loaded.adapter_state_dict()[key], t, atol=0, rtol=0)
    half = PeftModel.from_pretrained(tiny("llama", "causal-lm", seed=0).to(torch.bfloat16), tmp_path,
                                     autocast_adapter_dtype=False)
    assert {t.dtype for t in half.adapter_state_dict().values()} == {torch.bfloat16}
