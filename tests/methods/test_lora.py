"""LoRA against its closed form: h = W x + s · B A x, ΔW = s · B A, s = alpha/r (or alpha/√r).
DoRA against its own: h = f ⊙ (W + s · B A) x + b, f = m / ‖W + s · B A‖ (norm per output feature,
detached)."""

import math

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peftlab import BASE, ConfigError, LoraConfig, get_peft_model


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
    ("use_dora", "yes", "use_dora must be True or False"),
    ("target_modules", "(unclosed", "not a valid regular expression"),
])
def test_invalid_config_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**{field: value})


# -- DoRA ------------------------------------------------------------------------------------------
def perturb_magnitudes(model, scale=0.3, seed=1):
    """Move every magnitude off its initial norm, so f ≠ 1 and the magnitude really acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.peft_config:
            for k, t in model.adapter_state_dict(name).items():
                if k.endswith("lora_magnitude_vector"):
                    t.mul_(1 + scale * torch.randn(t.shape, generator=g))


def dora_factor(W, delta, m):
    """f = m / ‖W + ΔW‖ over d_in; W, ΔW: (d_out, d_in)."""
    return m / torch.linalg.norm(W + delta, dim=1)


def test_dora_forward_magnitude_init_and_delta_match_closed_form():
    toy = Toy()
    emb_w, lin_w, lin_b, conv_w, conv_b = (t.detach().clone() for t in
                                          (toy.emb.weight, toy.lin.weight, toy.lin.bias, toy.conv.weight, toy.conv.bias))
    model = get_peft_model(toy, LoraConfig(r=3, lora_alpha=5, target_modules=["emb", "lin", "conv"],
                                           init_lora_weights=False, use_dora=True))
    s = 5 / 3
    (Ae, Be), (Al, Bl), (Ac, Bc) = (lora_tensors(model, p) for p in ("emb", "lin", "conv"))
    state = model.adapter_state_dict()
    m = {p: state[f"{p}.lora_magnitude_vector"] for p in ("emb", "lin", "conv")}
    assert m["emb"].shape == (6,) and m["lin"].shape == (5,) and m["conv"].shape == (4,)
    # In (d_out, d_in): Embedding (vocab, dim) and Conv1D (in, out) are transposed.
    W = {"emb": emb_w.T, "lin": lin_w, "conv": conv_w.T}
    dW = {"emb": s * Be @ Ae, "lin": s * Bl @ Al, "conv": s * Bc @ Ac}
    with torch.no_grad():
        for p in W:  # the magnitude starts at the norm of W + ΔW: f = 1
            torch.testing.assert_close(m[p], torch.linalg.norm(W[p] + dW[p], dim=1))
        perturb_magnitudes(model)
        f = {p: dora_factor(W[p], dW[p], m[p]) for p in W}
        assert all((f[p] - 1).abs().max() > 0.05 for p in f)

        ids = torch.tensor([[1, 4, 0, 7], [3, 3, 9, 19]])
        e = f["emb"] * (W["emb"] + dW["emb"]).T[ids]
        h = f["lin"] * (e @ (W["lin"] + dW["lin"]).T) + lin_b
        expected = f["conv"] * (h @ (W["conv"] + dW["conv"]).T) + conv_b
        torch.testing.assert_close(model(input_ids=ids), expected, atol=1e-5, rtol=1e-5)

        layers = dict(model.adapter_layers())
        for p, layout in (("emb", lambda t: t.T), ("lin", lambda t: t), ("conv", lambda t: t.T)):
            merged = f[p][:, None] * (W[p] + dW[p])
            torch.testing.assert_close(layers[p].delta_weight("default"), layout(merged - W[p]))


def test_dora_norm_is_a_constant_for_gradients():
    """With the norm n detached (DoRA §4.3), for y = (f ⊙ V x) + b, V = W + s B A, f = m / n and
    upstream gradient C: ∂m = Σ C ⊙ (V x) / n, ∂B = s (C ⊙ f)ᵀ (A x), ∂A = s Bᵀ (C ⊙ f)ᵀ x."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 5))
    model = get_peft_model(lin, LoraConfig(r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False,
                                           use_dora=True))
    perturb_magnitudes(model)
    state = model.adapter_state_dict()
    A, B, m = (state[f"0.lora_{k}"] for k in ("A.weight", "B.weight", "magnitude_vector"))
    s = 3 / 2
    X, C = torch.randn(7, 6), torch.randn(7, 5)
    (model(X) * C).sum().backward()
    with torch.no_grad():
        V = lin[0].weight + s * B @ A
        n = torch.linalg.norm(V, dim=1)
        f = m / n
        torch.testing.assert_close(m.grad, (C * (X @ V.T)).sum(0) / n)
        torch.testing.assert_close(B.grad, s * (C * f).T @ (X @ A.T))
        torch.testing.assert_close(A.grad, s * B.T @ (C * f).T @ X)


def test_dora_mixed_rows_with_plain_lora_and_base_equal_separate_runs():
    """Per-row factors: DoRA rows get their adapter's f, plain LoRA and __base__ rows none."""
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["emb", "lin", "conv"], init_lora_weights=False,
                                             use_dora=True), "d")
    model.add_adapter("e", LoraConfig(r=3, target_modules=["lin"], init_lora_weights=False, use_dora=True))
    model.add_adapter("l", LoraConfig(r=4, target_modules=["lin", "conv"], init_lora_weights=False))
    perturb_magnitudes(model)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]])
    rows = ["d", "l", BASE, "e", "d"]

    def grads(names):
        g = {(n, k): t.grad.clone() for n in names for k, t in model.adapter_state_dict(n).items()}
        model.zero_grad()
        return g

    mixed = model(input_ids=ids, adapter_names=rows)
    mixed.pow(2).sum().backward()
    mixed_grads = grads(["d", "e", "l"])
    for name in ("d", "e", "l", BASE):
        keep = torch.tensor([r == name for r in rows])
        if name == BASE:
            with model.disable_adapter(), torch.no_grad():
                single = model(input_ids=ids)
        else:
            model.set_adapter(name)
            single = model(input_ids=ids)
            single[keep].pow(2).sum().backward()
            for k, g in grads([name]).items():
                torch.testing.assert_close(mixed_grads[k], g, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[keep], single[keep], atol=1e-6, rtol=1e-5)


def test_dora_merge_on_top_of_lora_equals_the_stacked_forward_and_unmerges_exactly():
    """Stacked [l, d], as in Hugging Face PEFT: d scales the output so far, f_d ⊙ (W + ΔW_l + s B_d A_d)
    with f_d's norm on the base W + s B_d A_d — so merging d after l takes the norm without l."""
    toy = Toy()
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    model = get_peft_model(toy, LoraConfig(r=2, target_modules=["lin", "conv"], init_lora_weights=False), "l")
    model.add_adapter("d", LoraConfig(r=3, target_modules=["emb", "lin", "conv"], init_lora_weights=False,
                                      use_dora=True))
    perturb_magnitudes(model)
    model.set_adapter(["l", "d"])
    ids = torch.tensor([[1, 2, 3, 0], [5, 6, 7, 19]])
    state = model.adapter_state_dict("d")
    lin = dict(model.adapter_layers())["lin"]
    with torch.no_grad():
        W, b, x = lin.base_weight.clone(), lin.bias, torch.randn(3, 6)
        dd = (8 / 3) * state["lin.lora_B.weight"] @ state["lin.lora_A.weight"]
        f = dora_factor(W, dd, state["lin.lora_magnitude_vector"])
        torch.testing.assert_close(lin(x), f * (x @ (W + lin.delta_weight("l") + dd).T) + b)

        stacked = model(input_ids=ids)
        delta_d = lin.delta_weight("d")
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids), stacked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lin.delta_weight("d"), delta_d)  # relative to the unmerged W, merged or not
        model.merge_adapter()  # idempotent
        torch.testing.assert_close(model(input_ids=ids), stacked, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids), stacked, atol=1e-6, rtol=1e-6)
        for k, v in model.base_model.state_dict().items():
            k = k.replace(".base_layer", "")
            if k in before:
                torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
        model.merge_adapter(["d"])  # alone: W + ΔW = f ⊙ (W + s B A)
        torch.testing.assert_close(lin.base_weight, f[:, None] * (W + dd), atol=1e-6, rtol=1e-6)
