"""LoraLinear: a training step's LoRA adapter inside the base layer's GEMMs (one autograd node,
the input gradient summed in place). It must give what the base layer and the adapter give as
separate nodes — outputs and every gradient — and serve only where it may."""

import pytest
import torch
import torch.nn.functional as F

from peftlab import LoraConfig, get_peft_model, ops
from peftlab.models import tiny
from peftlab.quant import quantize_model

TOL = dict(atol=1e-12, rtol=1e-12)  # float64: only the order of summation differs


@pytest.fixture
def calls(monkeypatch):
    """How many times LoraLinear ran (spy on its apply)."""
    seen = []
    original = ops.LoraLinear.apply
    monkeypatch.setattr(ops.LoraLinear, "apply", lambda *a: seen.append(1) or original(*a))
    return seen


@pytest.fixture
def options():
    before = ops.options()
    yield
    ops.configure(**before)


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_equals_base_plus_adapter_and_passes_gradcheck(bias):
    n, d_in, d_out, r, s = 7, 11, 9, 3, 1.7
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    b = torch.randn(d_out, dtype=torch.float64, generator=g) if bias else None
    x, A, B = (torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
               for shape in ((n, d_in), (r, d_in), (d_out, r)))
    y = ops.LoraLinear.apply(x, weight, b, A, B, s)
    y_ref = F.linear(x, weight, b) + s * (x @ A.T) @ B.T
    torch.testing.assert_close(y, y_ref, **TOL)
    grad_out = torch.randn(n, d_out, dtype=torch.float64, generator=g)
    for got, want in zip(torch.autograd.grad(y, [x, A, B], grad_out), torch.autograd.grad(y_ref, [x, A, B], grad_out)):
        torch.testing.assert_close(got, want, **TOL)
    assert torch.autograd.gradcheck(lambda x, A, B: ops.LoraLinear.apply(x, weight, b, A, B, 0.6), (x, A, B))
    # No gradient asked for the input (a first layer reading frozen embeddings): none computed.
    y = ops.LoraLinear.apply(x.detach(), weight, b, A, B, s)
    dA, dB = torch.autograd.grad(y, [A, B], grad_out)
    torch.testing.assert_close(dA, s * (grad_out @ B).T @ x.detach(), **TOL)


def _grads(model, ids, **kw):
    model.zero_grad()
    out = model(input_ids=ids, **kw).logits
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch, task", [("llama", "causal-lm"), ("bert", "seq-cls")])
def test_training_inside_the_base_equals_the_separate_nodes(arch, task, calls, options):
    """Every adapted linear layer of a training forward takes LoraLinear; outputs and gradients
    equal those of fuse_with_base=False (base and adapter as separate nodes)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny(arch, task, seed=0).double(),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    inside = _grads(model, ids)
    assert len(calls) == len(model.adapter_layers()) > 0
    calls.clear()
    ops.configure(fuse_with_base=False)
    apart = _grads(model, ids)
    assert calls == []
    torch.testing.assert_close(inside[0], apart[0], **TOL)
    assert inside[1].keys() == apart[1].keys() and len(inside[1]) == 2 * len(model.adapter_layers())
    for k in inside[1]:
        torch.testing.assert_close(inside[1][k], apart[1][k], **TOL)


@pytest.mark.parametrize("case", ["no_grad", "dora", "dropout", "quantised", "hook", "mixed", "two_adapters"])
def test_what_does_not_run_inside_the_base_gives_the_same_results(case, calls):
    """No gradient, DoRA, dropout while training, a quantised base, a base layer with a hook, a
    mixed batch and two active adapters take the separate path (and a hook still runs)."""
    torch.manual_seed(0)
    base = tiny("llama", "causal-lm", seed=0).double()
    if case == "quantised":
        base = quantize_model(base.float(), "int8").double()
    config = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False,
                        use_dora=case == "dora", lora_dropout=0.5 if case == "dropout" else 0.0)
    model = get_peft_model(base, config)
    model.add_adapter("other", config)
    model.train(case != "no_grad")
    kw = {"adapter_names": ["default", "other", "default"]} if case == "mixed" else {}
    if case == "two_adapters":
        model.set_adapter(["default", "other"])
    seen = []
    if case == "hook":
        layer = dict(model.adapter_layers())["model.layers.0.self_attn.q_proj"]
        layer.base_layer.register_forward_hook(lambda *a: seen.append(1))
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(case != "no_grad"):
        torch.manual_seed(5)
        out = model(input_ids=ids, **kw).logits
    with torch.no_grad():  # the reference: no gradient, so never inside the base
        torch.manual_seed(5)
        ref = model(input_ids=ids, **kw).logits
    if case == "hook":
        assert len(calls) == 3 and len(seen) == 2  # the hooked layer ran its own base in both forwards
    else:
        assert calls == []
    if case != "dropout":  # dropout's masks differ between the two forwards' RNG use
        torch.testing.assert_close(out.detach(), ref, **TOL)


def test_fp32_adapters_on_a_bf16_base_run_inside_it_cast_down(calls, options):
    """autocast_adapter_dtype's fp32 A, B on a bf16 base: LoraLinear casts the weights (not the
    activations) to bf16 and hands back fp32 gradients. The oracle is the same model in fp32: the
    inside path's gradients are as close to it as the separate nodes' (which cast activations up)."""
    import copy

    torch.manual_seed(0)
    model = get_peft_model(tiny("llama", "causal-lm", seed=0).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    reference = copy.deepcopy(model).float()  # the bf16 weights, exactly, in fp32
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    inside = _grads(model, ids)
    assert len(calls) == len(model.adapter_layers()) > 0
    assert {g.dtype for g in inside[1].values()} == {torch.float32}
    ops.configure(fuse_with_base=False)
    apart = _grads(model, ids)
    exact = _grads(reference, ids)

    def error(got, want):
        return ((got.float() - want).norm() / want.norm()).item()

    assert error(inside[0], exact[0]) <= max(2 * error(apart[0], exact[0]), 1e-2)
    for k in exact[1]:
        assert error(inside[1][k], exact[1][k]) <= max(2 * error(apart[1][k], exact[1][k]), 2e-2), k


def test_on_a_bf16_base_inference_computes_as_training_does(calls):
    """fp32 adapters on a bf16 base: a no-grad forward casts the weights down too (not x up), so it
    runs the very GEMMs LoraLinear runs in training — the outputs agree bit for bit."""
    torch.manual_seed(0)
    model = get_peft_model(tiny("llama", "causal-lm", seed=0).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert {t.dtype for t in model.adapter_state_dict().values()} == {torch.float32}
    # 8×16 token rows: enough for siblings to share down-projections in a no-grad forward
    # (ops.fuse.SHARE_MIN_TOKENS), which must not cast x up either
    ids = torch.randint(3, 100, (8, 16), generator=torch.Generator().manual_seed(1))
    assert ids.numel() >= ops.fuse.SHARE_MIN_TOKENS
    model.train()  # no dropout configured: train and eval compute the same
    trained = model(input_ids=ids).logits
    assert len(calls) == len(model.adapter_layers())
    with torch.no_grad():
        served = model(input_ids=ids).logits
    assert served.dtype == torch.bfloat16
    torch.testing.assert_close(served, trained.detach(), atol=0, rtol=0)
