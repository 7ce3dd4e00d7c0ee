"""LoHa against its closed form ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha/r, its two forward modes, and
FedPara's rank claim."""

import math

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peftlab import BASE, ConfigError, LoHaConfig, LoraConfig, get_peft_model
from peftlab.methods.loha import FactoredDelta, FactoredLinear, choose_forward_mode, col_khatri_rao, row_khatri_rao
from peftlab.models import tiny


class Toy(nn.Module):
    def __init__(self, d_in=6, d_hidden=5, d_out=4):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d_in, d_hidden)
        self.conv = Conv1D(d_out, d_hidden)  # GPT-2 layout: weight (in, out)

    def forward(self, x):
        return self.conv(self.lin(x))


def factors(model, path, name="default"):
    state = model.adapter_state_dict(name)
    return [state[f"{path}.{k}"].detach() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")]


X = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["materialize", "factored", "auto"])
def test_forward_and_delta_match_closed_form(mode):
    toy = Toy()
    lin_w, lin_b, conv_w, conv_b = (t.detach().clone()
                                    for t in (toy.lin.weight, toy.lin.bias, toy.conv.weight, toy.conv.bias))
    model = get_peft_model(toy, LoHaConfig(r=2, alpha=3, target_modules=["lin", "conv"], init_weights=False,
                                           forward_mode=mode))
    s = 3 / 2
    (a1, b1, a2, b2), (c1, d1, c2, d2) = factors(model, "lin"), factors(model, "conv")
    assert a1.shape == (5, 2) and b1.shape == (2, 6) and c1.shape == (4, 2) and d2.shape == (2, 5)
    delta_lin = (a1 @ b1) * (a2 @ b2) * s  # (d_out, d_in)
    delta_conv = (c1 @ d1) * (c2 @ d2) * s
    with torch.no_grad():
        h = X @ lin_w.T + lin_b + X @ delta_lin.T
        expected = h @ conv_w + conv_b + h @ delta_conv.T
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=1e-5)
        layers = dict(model.adapter_layers())
        torch.testing.assert_close(layers["lin"].delta_weight("default"), delta_lin)
        torch.testing.assert_close(layers["conv"].delta_weight("default"), delta_conv.T)  # Conv1D is (in, out)


@pytest.mark.parametrize("shape", [(7, 3, 5), (16, 4, 16), (3, 1, 9)])
def test_khatri_rao_identity(shape):
    d_out, r, d_in = shape
    g = torch.Generator().manual_seed(0)
    w1a, w2a = (torch.randn(d_out, r, generator=g, dtype=torch.float64) for _ in range(2))
    w1b, w2b = (torch.randn(r, d_in, generator=g, dtype=torch.float64) for _ in range(2))
    U, V = row_khatri_rao(w1a, w2a), col_khatri_rao(w1b, w2b)
    assert U.shape == (d_out, r * r) and V.shape == (r * r, d_in)
    torch.testing.assert_close(U[2], torch.kron(w1a[2], w2a[2]))  # row i = kron of rows
    torch.testing.assert_close(V[:, 1], torch.kron(w1b[:, 1], w2b[:, 1]))  # column j = kron of columns
    torch.testing.assert_close(U @ V, (w1a @ w1b) * (w2a @ w2b), atol=1e-12, rtol=1e-12)


def _factors(d_out, r, d_in, dtype, seed):
    """W1a, W1b, W2a, W2b with unit-scale products, as leaf tensors that want gradients."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((d_out, r), (r, d_in), (d_out, r), (r, d_in))
    return [(torch.randn(s, generator=g, dtype=dtype) / math.sqrt(s[1])).requires_grad_() for s in shapes]


# (tokens, d_in, d_out, r): r² < min(d) (the case the factored route is for), r² > min(d), one token.
@pytest.mark.parametrize("n,d_in,d_out,r", [(13, 40, 24, 3), (7, 9, 16, 4), (1, 30, 11, 2)])
def test_factored_delta_matches_dense_reference(n, d_in, d_out, r):
    """FactoredDelta's output and the gradients of x and all four factors, in float32, equal autograd
    through the dense ΔW = (W1a W1b) ⊙ (W2a W2b) · s computed in float64."""
    s = 1.7
    ws = _factors(d_out, r, d_in, torch.float32, seed=n)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad_out = torch.randn(n, d_out, generator=torch.Generator().manual_seed(2))
    y = FactoredDelta.apply(x, *ws, s)
    grads = torch.autograd.grad(y, [x, *ws], grad_out)

    x64, *ws64 = (t.detach().double().requires_grad_() for t in (x, *ws))
    w1a, w1b, w2a, w2b = ws64
    y_ref = x64 @ ((w1a @ w1b) * (w2a @ w2b) * s).T
    grads_ref = torch.autograd.grad(y_ref, [x64, *ws64], grad_out.double())
    torch.testing.assert_close(y, y_ref.float(), atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("x", "W1a", "W1b", "W2a", "W2b"), grads, grads_ref):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_factored_delta_adds_into_the_base_output():
    """Given the base layer's output, FactoredDelta returns base + ΔW x (one addmm), passes the
    output's gradient to base unchanged, and leaves base itself untouched."""
    n, d_in, d_out, r, s = 11, 20, 14, 3, 0.9
    ws = _factors(d_out, r, d_in, torch.float64, seed=3)
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    base = torch.randn(n, d_out, dtype=torch.float64, requires_grad=True)
    before = base.detach().clone()
    grad_out = torch.randn(n, d_out, dtype=torch.float64)
    y = FactoredDelta.apply(x, *ws, s, base)
    got = torch.autograd.grad(y, [x, *ws, base], grad_out)
    y_ref = base + FactoredDelta.apply(x, *ws, s)
    want = torch.autograd.grad(y_ref, [x, *ws, base], grad_out)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got[-1], grad_out, atol=0, rtol=0)
    assert torch.equal(base.detach(), before)
    assert torch.autograd.gradcheck(lambda x, b, *w: FactoredDelta.apply(x, *w, 0.7, b),
                                    (x[:3, :5].detach().requires_grad_(), base[:3, :4].detach().requires_grad_(),
                                     *_factors(4, 2, 5, torch.float64, seed=1)))


@pytest.mark.parametrize("bias", [True, False])
def test_factored_linear_equals_base_plus_factored_delta(bias):
    """FactoredLinear (base GEMMs inside, one input gradient) gives x Wᵀ + b + ΔW x and the same
    gradients for x and the factors as the base layer and FactoredDelta apart; W and b get none."""
    n, d_in, d_out, r, s = 9, 12, 10, 3, 1.3
    ws = _factors(d_out, r, d_in, torch.float64, seed=4)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    b = torch.randn(d_out, dtype=torch.float64, generator=g) if bias else None
    x = torch.randn(n, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    grad_out = torch.randn(n, d_out, dtype=torch.float64, generator=g)
    y = FactoredLinear.apply(x, weight, b, *ws, s)
    y_ref = torch.nn.functional.linear(x, weight, b) + FactoredDelta.apply(x, *ws, s)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for got, want in zip(torch.autograd.grad(y, [x, *ws], grad_out), torch.autograd.grad(y_ref, [x, *ws], grad_out)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x, *w: FactoredLinear.apply(x, weight[:4, :5], None if b is None else b[:4],
                                                                       *w, 0.7),
                                    (x[:3, :5].detach().requires_grad_(), *_factors(4, 2, 5, torch.float64, seed=2)))


def test_a_frozen_dense_base_runs_inside_the_factored_route_and_nothing_else_does(monkeypatch):
    """The fused route serves a plain frozen nn.Linear on the factored route; a quantised base,
    mixed rows and the materialised route take the separate path, with the same outputs."""
    from peftlab.quant import quantize_model

    calls = []
    original = FactoredLinear.apply
    monkeypatch.setattr(FactoredLinear, "apply", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    config = LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"], init_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(tiny("llama", "causal-lm", seed=0).eval(), config)
    with torch.no_grad():
        fused = model(input_ids=ids).logits
    assert len(calls) == 4  # two layers × two targets
    calls.clear()
    torch.manual_seed(0)
    other = get_peft_model(tiny("llama", "causal-lm", seed=0).eval(), config.replace(forward_mode="materialize"))
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, fused, atol=1e-5, rtol=1e-5)
        model(input_ids=ids, adapter_names=["default", "default"])
    torch.manual_seed(0)
    quantized = get_peft_model(quantize_model(tiny("llama", "causal-lm", seed=0).eval(), "int8"), config)
    with torch.no_grad():
        quantized(input_ids=ids)
    assert calls == []
    # A hook on a base layer still runs: that layer takes the separate path.
    seen = []
    layer = dict(model.adapter_layers())["model.layers.0.self_attn.q_proj"]
    handle = layer.base_layer.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fused, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert seen == [1] and len(calls) == 3


@pytest.mark.parametrize("n,d_in,d_out,r", [(5, 7, 6, 2), (3, 4, 9, 3)])
def test_factored_delta_gradcheck(n, d_in, d_out, r):
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *w: FactoredDelta.apply(x, *w, 0.7),
                                    (x, *_factors(d_out, r, d_in, torch.float64, seed=0)))


def test_factored_route_keeps_only_x_and_h_for_backward():
    """The point of FactoredDelta: neither U (d_out × r²) nor V (r² × d_in) waits for backward, only
    h = x Vᵀ (tokens × r²) besides x and the weights."""
    model = get_peft_model(nn.Sequential(nn.Linear(64, 96)), LoHaConfig(r=4, target_modules=["0"],
                                                                       forward_mode="factored"))
    x = torch.randn(2, 10, 64, requires_grad=True)  # a layer inside the network
    kept = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    extra = [nbytes for ptr, nbytes in saved.items() if ptr not in kept]
    assert extra == [2 * 10 * 4 ** 2 * 4]  # h: 20 tokens × r² = 16, float32


def test_factored_route_under_autocast():
    """bf16 autocast (CPU here, CUDA in training): the backward runs its GEMMs in the forward's
    dtype — without that, g (bf16) @ U (fp32) fails — and lands near the fp32 gradients."""
    def run(autocast):
        torch.manual_seed(0)
        model = get_peft_model(nn.Sequential(nn.Linear(64, 48)), LoHaConfig(r=3, target_modules=["0"],
                                                                           init_weights=False, forward_mode="factored"))
        x = torch.randn(4, 8, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x).float().pow(2).sum().backward()
        return [x.grad] + [t.grad for t in model.adapter_state_dict().values()]

    for got, want in zip(run(True), run(False)):
        assert got.dtype == torch.float32
        assert (got - want).norm() < 2e-2 * want.norm()  # bf16 keeps ~3 significant digits


def _outputs_and_grads(mode, x, rows=None):
    torch.manual_seed(3)  # the same adapter weights for every mode
    model = get_peft_model(nn.Sequential(nn.Linear(24, 20)), LoHaConfig(r=3, alpha=5, target_modules=["0"],
                                                                       init_weights=False, forward_mode=mode), "a")
    model.add_adapter("b", LoHaConfig(r=2, target_modules=["0"], init_weights=False, forward_mode=mode))
    out = model(x, adapter_names=rows)
    out.pow(2).sum().backward()
    grads = {(n, k): t.grad.clone() for n in ("a", "b") for k, t in model.adapter_state_dict(n).items()
             if t.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("rows", [None, ["b", "a", BASE, "a"]], ids=["single", "mixed"])
def test_both_forward_modes_give_the_same_outputs_and_gradients(rows):
    x = torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(4))
    out_m, grads_m = _outputs_and_grads("materialize", x, rows)
    out_f, grads_f = _outputs_and_grads("factored", x, rows)
    torch.testing.assert_close(out_f, out_m, atol=1e-5, rtol=1e-5)
    assert grads_m.keys() == grads_f.keys() and len(grads_m) == (4 if rows is None else 8)
    for k in grads_m:
        torch.testing.assert_close(grads_f[k], grads_m[k], atol=1e-4, rtol=1e-4)


def test_mixed_ranks_and_missing_layers_in_one_batch():
    model = get_peft_model(Toy(), LoHaConfig(r=2, target_modules=["lin"], init_weights=False), "a")
    model.add_adapter("b", LoHaConfig(r=4, alpha=3, target_modules=["lin", "conv"], init_weights=False))
    x = torch.randn(3, 2, 6)
    with torch.no_grad():
        mixed = model(x, adapter_names=["b", "a", "b"])
        model.set_adapter("a")
        only_a = model(x)
        model.set_adapter("b")
        only_b = model(x)
    torch.testing.assert_close(mixed[[0, 2]], only_b[[0, 2]], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[1], only_a[1], atol=1e-6, rtol=1e-5)


def test_auto_mode_follows_the_flop_estimate():
    # r² = 16 < min(d) = 64 with many tokens: the factored route needs no 64 × 64 matrix.
    assert choose_forward_mode(d_in=64, d_out=64, r=4, tokens=4096) == "factored"
    # r² = 64 = min(d): per token U (V x) costs 2·r²·(d_in + d_out) > 2·d_in·d_out.
    assert choose_forward_mode(d_in=64, d_out=64, r=8, tokens=4096) == "materialize"
    # One decoding token: building ΔW (~4r·d_in·d_out) dominates, so factored wins even then.
    assert choose_forward_mode(d_in=64, d_out=64, r=8, tokens=1) == "factored"


def test_auto_mode_runs_factored_without_building_delta(monkeypatch):
    model = get_peft_model(nn.Sequential(nn.Linear(64, 64)), LoHaConfig(r=4, target_modules=["0"], init_weights=False))
    layer = dict(model.adapter_layers())["0"]
    x = torch.randn(8, 512, 64)
    assert layer.mode_for(["default"], tokens=8 * 512) == "factored"
    with torch.no_grad():
        expected = model(x)
        with model.disable_adapter():
            base = model(x)

        def no_delta(name):
            raise AssertionError("the factored route must not materialise ΔW")

        monkeypatch.setattr(layer, "delta", no_delta)
        torch.testing.assert_close(model(x), expected)
        mixed = model(x, adapter_names=[BASE, "default"] * 4)
    torch.testing.assert_close(mixed[0::2], base[0::2], atol=0, rtol=0)
    torch.testing.assert_close(mixed[1::2], expected[1::2], atol=1e-5, rtol=1e-5)


def test_fedpara_rank_claim_at_equal_parameter_count():
    """LoHa(r) and LoRA(2r) have the same parameter count; ΔW has rank r² for LoHa, 2r for LoRA."""
    d_in, d_out, r = 48, 40, 4
    # float64 all the way, so the numerical rank is the exact rank of the random factors.
    loha = get_peft_model(nn.Sequential(nn.Linear(d_in, d_out, dtype=torch.float64)),
                          LoHaConfig(r=r, target_modules=["0"], init_weights=False))
    lora = get_peft_model(nn.Sequential(nn.Linear(d_in, d_out, dtype=torch.float64)),
                          LoraConfig(r=2 * r, target_modules=["0"], init_lora_weights=False))
    n_loha = sum(t.numel() for t in loha.adapter_state_dict().values())
    n_lora = sum(t.numel() for t in lora.adapter_state_dict().values())
    assert n_loha == n_lora == 2 * r * (d_in + d_out)
    with torch.no_grad():
        rank_loha = torch.linalg.matrix_rank(dict(loha.adapter_layers())["0"].delta_weight("default"))
        rank_lora = torch.linalg.matrix_rank(dict(lora.adapter_layers())["0"].delta_weight("default"))
    assert rank_loha == r * r == 16
    assert rank_lora == 2 * r == 8


def test_default_init_zeroes_w2_b_only():
    toy = Toy()
    with torch.no_grad():
        expected = toy(X)
    model = get_peft_model(toy, LoHaConfig(r=4, target_modules=["lin"]))
    w1a, w1b, w2a, w2b = factors(model, "lin")
    assert torch.count_nonzero(w2b) == 0
    assert all(torch.count_nonzero(t) == t.numel() for t in (w1a, w1b, w2a))
    # kaiming_uniform(a=√5) gives U(-1/√fan_in, 1/√fan_in); fan_in is the second dimension.
    assert w1a.abs().max() <= 1 / math.sqrt(4) and w1b.abs().max() <= 1 / math.sqrt(6)
    with torch.no_grad():
        assert torch.equal(model(X), expected)


@pytest.mark.parametrize("field,value,match", [
    ("r", 0, "r must be a positive int"),
    ("alpha", 0, "alpha must be > 0"),
    ("init_weights", "gaussian", "init_weights must be True or False"),
    ("forward_mode", "fast", "forward_mode must be one of"),
    ("target_modules", "(unclosed", "not a valid regular expression"),
])
def test_invalid_config_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        LoHaConfig(**{field: value})
