"""Sibling LoRA layers sharing one down-projection (ops.fuse): outputs and gradients equal the
unfused computation (every layer its own x Aᵀ) on tiny llama (q/k/v, gate/up) and bert; sharing
really happens where it may (counted), not where it may not (dropout, DoRA, merged); nothing is
left in the router's scratch after a forward."""

import pytest
import torch

from peftlab import BASE, LoraConfig, get_peft_model, ops
from peftlab.methods.lora import LoraLayer
from peftlab.models import tiny
from peftlab.quant import quantize_model

# float64 models: sharing changes only the order of summation, so the results agree to ~1e-15 relative
TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(autouse=True)
def fusion_on():
    before = ops.options()
    # Sharing is what these test: training runs keep the adapter out of the base's GEMMs, where
    # each layer would compute its own down-projection (tests/ops/test_lora_linear.py).
    ops.configure(fuse_shared_input=True, fuse_with_base=False)
    yield
    ops.configure(**before)


@pytest.fixture
def shares(monkeypatch):
    """How many siblings' shares were left for them to take, per forward (spy on SiblingGroup.leave)."""
    left = []
    leave = ops.SiblingGroup.leave

    def spy(self, scratch, x, parts):
        left.append(len(parts))
        return leave(self, scratch, x, parts)

    monkeypatch.setattr(ops.SiblingGroup, "leave", spy)
    return left


def make(arch="llama", task="causal-lm", dropout=0.0, dora=False):
    model = tiny(arch, task, seed=0).double()
    torch.manual_seed(1)
    lin = dict(target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout, use_dora=dora)
    peft = get_peft_model(model, LoraConfig(r=2, **lin), "a")
    peft.add_adapter("b", LoraConfig(r=5, lora_alpha=3, **lin))
    peft.add_adapter("c", LoraConfig(r=3, target_modules=["query", "value", "q_proj", "v_proj", "up_proj"],
                                     init_lora_weights=False))
    return peft


def inputs(arch, rows=4, tokens=16):
    ids = torch.randint(3, 100, (rows, tokens), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def out_and_grads(model, batch, **kw):
    model.zero_grad()
    out = model(**batch, **kw).logits
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    return out.detach(), grads


def both(model, batch, **kw):
    """(fused, unfused) outputs and gradients."""
    fused = out_and_grads(model, batch, **kw)
    assert model.router.scratch == {}
    ops.configure(fuse_shared_input=False)
    return fused, out_and_grads(model, batch, **kw)


def assert_same(a, b, rel=None):
    """Equal to TOL (float64), or with ``rel`` to rel · the tensor's largest magnitude (float32)."""
    pairs = [(a[0], b[0], "output")] + [(a[1][k], b[1][k], k) for k in a[1]]
    assert a[1].keys() == b[1].keys()
    for x, y, what in pairs:
        tol = TOL if rel is None else dict(atol=rel * y.abs().max().item(), rtol=rel)
        torch.testing.assert_close(x, y, **tol, msg=what)


def test_siblings_are_found_by_shape_and_readers_of_other_inputs_leave():
    """Leaving happens in forwards without autograd only: gradient checkpointing's recomputation
    must see the groups its forward saw."""
    model = make()
    layers = dict(model.adapter_layers("a"))
    attn = "model.layers.0.self_attn."
    members = lambda path: {p for p, m in layers.items() if m._siblings is layers[path]._siblings}  # noqa: E731
    # o_proj has q's input width (32) and the same parent: a candidate until seen reading another tensor
    assert members(attn + "q_proj") == {attn + s for s in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert layers["model.layers.0.mlp.down_proj"]._siblings is None  # its input width is its own
    model(**inputs("llama"))
    assert len(layers[attn + "q_proj"]._siblings.members()) == 4
    with torch.no_grad():
        model(**inputs("llama"))
    group = layers[attn + "q_proj"]._siblings
    assert set(group.members()) == {layers[attn + s] for s in ("q_proj", "k_proj", "v_proj")}
    mlp = layers["model.layers.0.mlp.gate_proj"]._siblings
    assert set(mlp.members()) == {layers["model.layers.0.mlp." + s] for s in ("gate_proj", "up_proj")}


@pytest.mark.parametrize("arch, task", [("llama", "causal-lm"), ("bert", "seq-cls")])
@pytest.mark.parametrize("active", [["a"], ["a", "c"]])
def test_single_route_training_matches_unfused(arch, task, active, shares):
    model = make(arch, task)
    model.set_adapter(active)
    model.train()
    fused, unfused = both(model, inputs(arch))
    assert sum(shares) > 0
    assert_same(fused, unfused)


@pytest.mark.parametrize("arch, task", [("llama", "causal-lm"), ("bert", "seq-cls")])
@pytest.mark.parametrize("rows, tokens", [(4, 6), (4, 1), (9, 1)])  # gathered prefill, gathered decode, masked
def test_mixed_route_matches_unfused(arch, task, rows, tokens, shares):
    """Decode steps that keep their rows' weights (4 rows × 1 token here) do not share."""
    model = make(arch, task)
    names = ["a", BASE, "b", "c", "a", "b", BASE, "c", "a"][:rows]
    if rows == 9:
        names = ["a", "b"] * 4 + [BASE]  # many rows over few adapters: the masked path
        assert ops.choose_path(9, 1, 3) == "masked"
    fused, unfused = both(model, inputs(arch, rows, tokens), adapter_names=names)
    assert (sum(shares) > 0) == ((rows, tokens) != (4, 1))
    assert_same(fused, unfused)


@pytest.mark.parametrize("tokens", [6, 2])
def test_frozen_mixed_inference_matches_unfused(tokens, shares):
    model = make()
    for p in model.parameters():
        p.requires_grad_(False)
    batch = inputs("llama", 4 if tokens > 2 else 6, tokens)
    names = ["a", BASE, "b", "c"] if tokens > 2 else ["a", "b"] * 3  # 6×2 over 2 adapters: masked
    with torch.inference_mode():
        fused = [model(**batch, adapter_names=names).logits for _ in range(2)]  # the second reuses the fused stacks
        assert model.router.scratch == {}
        ops.configure(fuse_shared_input=False)
        unfused = model(**batch, adapter_names=names).logits
    assert sum(shares) > 0
    for f in fused:
        torch.testing.assert_close(f, unfused, **TOL)


def test_generate_mixed_same_tokens_fused_or_not():
    model = make().eval()
    ids = inputs("llama", 4, 5)["input_ids"]
    kw = dict(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, adapter_names=["a", "b", BASE, "c"])
    with torch.no_grad():
        fused = model.generate(**kw)
        ops.configure(fuse_shared_input=False)
        assert torch.equal(fused, model.generate(**kw))


@pytest.mark.parametrize("mixed", [False, True])
def test_gradient_checkpointing_matches_unfused(mixed, shares):
    batch, kw = inputs("llama"), ({"adapter_names": ["a", "b", BASE, "c"]} if mixed else {})
    reference = make()
    reference.set_adapter(["a", "c"])
    ops.configure(fuse_shared_input=False)
    expected = out_and_grads(reference.train(), batch, **kw)
    ops.configure(fuse_shared_input=True)
    model = make()
    model.set_adapter(["a", "c"])
    model.gradient_checkpointing_enable()
    got = out_and_grads(model.train(), batch, **kw)
    assert sum(shares) > 0 and model.router.scratch == {}
    assert_same(got, expected)


@pytest.mark.parametrize("mixed", [False, True])
def test_dropout_in_training_is_not_shared(mixed, shares):
    """Each layer draws its own dropout mask; one shared x Aᵀ would share one mask. In eval,
    dropout is the identity and sharing resumes."""
    model = make(dropout=0.5)
    kw = {"adapter_names": ["a", "b", BASE, "a"]} if mixed else {}
    model.train()
    with torch.no_grad():
        model(**inputs("llama"), **kw)
    assert shares == []  # the route uses a and b only, both with dropout
    model.eval()
    fused, unfused = both(model, inputs("llama"), **kw)
    assert any(shares)
    assert_same(fused, unfused)


def test_dora_layers_are_not_shared_and_results_match():
    model = make(dora=True)
    model.set_adapter(["a", "c"])  # a: DoRA on every linear; c: plain LoRA on q, v, up
    fused, unfused = both(model.train(), inputs("llama"))
    assert_same(fused, unfused)
    fused, unfused = both(model, inputs("llama"), adapter_names=["a", "c", BASE, "c"])
    assert_same(fused, unfused)


def test_merged_adapters_and_disable_adapter(shares):
    model = make().eval()
    batch = inputs("llama")
    model.set_adapter(["a", "c"])
    with torch.no_grad():
        expected = model(**batch).logits
        model.merge_adapter(["a"])  # c stays unmerged: its layers still share
        merged = model(**batch).logits
        assert model.router.scratch == {}
        model.unmerge_adapter()
        with model.disable_adapter():
            base_fused = model(**batch).logits
        ops.configure(fuse_shared_input=False)
        with model.disable_adapter():
            base_unfused = model(**batch).logits
    assert any(shares)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(base_fused, base_unfused, **TOL)


def test_quantized_base_matches_unfused(shares):
    torch.manual_seed(3)
    model = get_peft_model(quantize_model(tiny("llama", "causal-lm", seed=0), "int8"),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    fused, unfused = both(model.train(), inputs("llama"), adapter_names=["a", "b", BASE, "a"])
    assert sum(shares) > 0
    assert_same(fused, unfused, rel=1e-4)  # float32: summation order shows


def test_scratch_is_emptied_even_if_a_sibling_never_runs():
    model = make()
    layers = dict(model.adapter_layers("a"))
    q = layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q, LoraLayer)
    x = torch.randn(4, 16, 32, dtype=torch.float64)
    with model.router.use(model.router.route):
        q(x)  # k and v never run: their shares wait in the scratch...
        assert model.router.scratch
    assert model.router.scratch == {}  # ...until the forward's route scope ends


def test_small_inputs_are_not_shared_on_the_single_adapter_path(shares):
    model = make().eval()
    with torch.no_grad():
        model(**inputs("llama", 2, 8))  # 16 token rows < SHARE_MIN_TOKENS
        assert shares == []
        model(**inputs("llama", 4, 16))
    assert shares


def test_configure_validates_and_reads_back():
    ops.configure(fuse_shared_input=False, fuse_with_base=True)
    assert ops.options() == {"fuse_shared_input": False, "fuse_with_base": True}
    with pytest.raises(ValueError, match="unknown option 'fuse'"):
        ops.configure(fuse=True)
    with pytest.raises(TypeError, match="True or False"):
        ops.configure(fuse_shared_input=1)
