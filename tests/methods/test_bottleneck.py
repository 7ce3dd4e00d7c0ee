"""Bottleneck adapters against their closed form: out = h + s · (U act(D h + b_D) + b_U) after an
output projection (houlsby/pfeiffer), out = f(x) + s · (U act(D x + b_D) + b_U) beside a block
(parallel); placement on the tiny architectures; norms trained per adapter; validation."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from peftlab import BASE, BottleneckConfig, ConfigError, PeftModel, get_peft_model
from tests.conftest import make_inputs, output_of

ACTS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}
ARCHS = ("llama", "gpt2", "bert", "t5")
VARIANTS = ("houlsby", "pfeiffer", "parallel")


class Toy(nn.Module):
    """lin (6 -> 5), conv (GPT-2 layout, 5 -> 4), and an FFN block ffn (4 -> 12 -> 4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5)
        self.conv = Conv1D(4, 5)
        self.ffn = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 4))

    def forward(self, x):
        return self.ffn(self.conv(self.lin(x)))


class PostLNOutput(nn.Module):
    """BERT's BertOutput: LayerNorm(dense(h) + input_tensor)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.dense = nn.Linear(8, 4)
        self.LayerNorm = nn.LayerNorm(4)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


def branch(state, path, x, act, s=1.0, name=""):
    """The closed form s · (U act(D x + b_D) + b_U) from the saved tensors."""
    D, bD = state[f"{path}.adapter_down.weight"], state[f"{path}.adapter_down.bias"]
    U, bU = state[f"{path}.adapter_up.weight"], state[f"{path}.adapter_up.bias"]
    return s * (ACTS[act](x @ D.T + bD) @ U.T + bU)


def run(model, arch, **kw):
    inputs = make_inputs(arch)
    with torch.no_grad():
        return output_of(model(**inputs, **kw), inputs)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_sequential_matches_closed_form(act):
    toy = Toy()
    ref = Toy()
    cfg = BottleneckConfig(variant="pfeiffer", bottleneck=3, activation=act, scaling=0.7, init="random",
                           target_modules=["lin", "conv"])
    model = get_peft_model(toy, cfg)
    state = model.adapter_state_dict()
    assert state["lin.adapter_down.weight"].shape == (3, 5) and state["lin.adapter_up.weight"].shape == (5, 3)
    assert state["conv.adapter_down.weight"].shape == (3, 4) and state["conv.adapter_up.bias"].shape == (4,)
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        h = ref.lin(x)
        h = h + branch(state, "lin", h, act, 0.7)
        h2 = ref.conv(h)
        h2 = h2 + branch(state, "conv", h2, act, 0.7)
        torch.testing.assert_close(model(x), ref.ffn(h2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_parallel_matches_closed_form(act):
    ref = Toy()
    model = get_peft_model(Toy(), BottleneckConfig(variant="parallel", bottleneck=2, activation=act, scaling=4.0,
                                                   init="random", target_modules=["ffn"]))
    state = model.adapter_state_dict()
    assert state["ffn.adapter_down.weight"].shape == (2, 4) and state["ffn.adapter_up.weight"].shape == (4, 2)
    x = torch.randn(3, 6)
    with torch.no_grad():
        xf = ref.conv(ref.lin(x))
        torch.testing.assert_close(model(x), ref.ffn(xf) + branch(state, "ffn", xf, act, 4.0), atol=1e-5, rtol=1e-5)


def test_parallel_on_post_ln_output_adds_to_the_residual():
    """BERT-style output modules: LN(dense(h) + x + s · adapter(x)), x = input_tensor."""
    ref = PostLNOutput()
    holder = nn.Sequential()
    holder.add_module("out", PostLNOutput())
    model = get_peft_model(holder, BottleneckConfig(variant="parallel", bottleneck=3, init="random", scaling=2.0,
                                                    target_modules=["out"]))
    state = model.adapter_state_dict()
    assert state["out.adapter_down.weight"].shape == (3, 4)  # reads the residual (width 4), not h (8)
    h, x = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    with torch.no_grad():
        expected = ref.LayerNorm(ref.dense(h) + x + branch(state, "out", x, "relu", 2.0))
        torch.testing.assert_close(model.base_model.out(h, x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.base_model.out(h, input_tensor=x), expected, atol=1e-5, rtol=1e-5)


def test_several_active_adapters_sequential_in_order_parallel_summed():
    ref = Toy()
    model = get_peft_model(Toy(), BottleneckConfig(bottleneck=2, init="random", target_modules=["lin"]), "a")
    model.add_adapter("b", BottleneckConfig(bottleneck=3, activation="gelu", init="random", target_modules=["lin"]))
    model.add_adapter("p", BottleneckConfig(variant="parallel", bottleneck=2, init="random", target_modules=["ffn"]))
    model.add_adapter("q", BottleneckConfig(variant="parallel", bottleneck=4, activation="swish", scaling=0.5,
                                            init="random", target_modules=["ffn"]))
    sa, sb = model.adapter_state_dict("a"), model.adapter_state_dict("b")
    sp, sq = model.adapter_state_dict("p"), model.adapter_state_dict("q")
    x = torch.randn(2, 6)
    with torch.no_grad():
        model.set_adapter(["b", "a"])
        h = ref.lin(x)
        h = h + branch(sb, "lin", h, "gelu")
        h = h + branch(sa, "lin", h, "relu")  # b first, then a on b's output
        torch.testing.assert_close(model(x), ref.ffn(ref.conv(h)), atol=1e-5, rtol=1e-5)
        model.set_adapter(["p", "q"])
        xf = ref.conv(ref.lin(x))
        expected = ref.ffn(xf) + branch(sp, "ffn", xf, "relu") + branch(sq, "ffn", xf, "swish", 0.5)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_mixed_batch_with_different_sizes_and_activations_on_toy():
    model = get_peft_model(Toy(), BottleneckConfig(bottleneck=2, init="random", target_modules=["lin"]), "a")
    model.add_adapter("b", BottleneckConfig(bottleneck=5, activation="swish", scaling=3.0, init="random",
                                            target_modules=["lin", "conv"]))
    x = torch.randn(4, 3, 6)
    with torch.no_grad():
        mixed = model(x, adapter_names=["b", "a", BASE, "b"])
        separate = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            separate[name] = model(x)
        with model.disable_adapter():
            separate[BASE] = model(x)
    for i, name in enumerate(["b", "a", BASE, "b"]):
        torch.testing.assert_close(mixed[i], separate[name][i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_on_every_arch(arch, variant, tiny_model, tmp_path):
    base = tiny_model(arch)
    expected = run(base, arch)
    model = get_peft_model(base, BottleneckConfig(variant=variant, reduction_factor=4))
    torch.testing.assert_close(run(model, arch), expected, atol=0, rtol=0)  # zero init = base
    model.add_adapter("r", BottleneckConfig(variant=variant, bottleneck=6, activation="gelu", init="random"))
    model.set_adapter("r")
    out = run(model, arch)
    assert (out - expected).abs().max() > 1e-4
    mixed = run(model, arch, adapter_names=["r", BASE, "r"])
    torch.testing.assert_close(mixed[[0, 2]], out[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], expected[1], atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path, selected_adapters=["r"])
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "r")
    torch.testing.assert_close(run(loaded, arch), out, atol=0, rtol=0)


@pytest.mark.parametrize("arch,variant,expected", [
    ("llama", "houlsby", ["self_attn.o_proj", "mlp.down_proj"]),
    ("llama", "parallel", ["layers.0.mlp"]),
    ("gpt2", "houlsby", ["attn.c_proj", "mlp.c_proj"]),
    ("gpt2", "pfeiffer", ["mlp.c_proj"]),
    ("bert", "houlsby", ["attention.output.dense", "layer.0.output.dense"]),
    ("bert", "pfeiffer", ["layer.0.output.dense"]),
    ("bert", "parallel", ["layer.0.output"]),
    ("t5", "houlsby", ["SelfAttention.o", "DenseReluDense.wo"]),
    ("t5", "parallel", ["DenseReluDense"]),
])
def test_default_placement(arch, variant, expected, tiny_model):
    model = get_peft_model(tiny_model(arch), BottleneckConfig(variant=variant, bottleneck=4, layers_to_transform=[0]))
    leaves = model.adapter_paths("default")
    encoder = [p for p in leaves if not p.startswith("decoder.")]
    assert len(encoder) == len(expected) and all(any(p.endswith("." + e) for p in encoder) for e in expected), leaves
    assert not any("EncDecAttention" in p or "crossattention" in p for p in leaves)


def test_t5_cross_attention_is_opt_in(tiny_model):
    cfg = BottleneckConfig(bottleneck=4, target_modules=["SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"])
    model = get_peft_model(tiny_model("t5"), cfg)
    assert sum("EncDecAttention.o" in p for p in model.adapter_paths("default")) == 2  # one per decoder block


def test_parameter_counts_bottleneck_and_reduction_factor(tiny_model):
    d, m, modules = 32, 8, 4  # houlsby on 2 llama layers: o_proj and down_proj each
    counts = []
    for cfg in (BottleneckConfig(bottleneck=m), BottleneckConfig(reduction_factor=d // m)):
        counts.append(get_peft_model(tiny_model("llama"), cfg).trainable_parameters()[0])
    assert counts == [modules * (m * d + m + d * m + d)] * 2
    pfeiffer = get_peft_model(tiny_model("llama"), BottleneckConfig(variant="pfeiffer", reduction_factor=16))
    assert pfeiffer.trainable_parameters()[0] == 2 * (2 * 2 * d + 2 + d)  # m = 32 // 16 = 2


def test_normal_init_is_truncated_and_near_identity(tiny_model):
    base = tiny_model("llama")
    expected = run(base, "llama")
    model = get_peft_model(base, BottleneckConfig(bottleneck=16, init="normal"))
    weights = [t for k, t in model.adapter_state_dict().items() if k.endswith("weight")]
    biases = [t for k, t in model.adapter_state_dict().items() if k.endswith("bias")]
    flat = torch.cat([w.flatten() for w in weights])
    assert flat.abs().max() <= 2e-2 and 0.005 < flat.std() < 0.012
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    diff = (run(model, "llama") - expected).abs().max()
    assert 0 < diff < 1e-2


def test_houlsby_and_parallel_adapters_share_a_model_in_either_order(tiny_model):
    for first, second in (("houlsby", "parallel"), ("parallel", "houlsby")):
        model = get_peft_model(tiny_model("llama"), BottleneckConfig(variant=first, bottleneck=4, init="random"), "a")
        model.add_adapter("b", BottleneckConfig(variant=second, bottleneck=6, init="random"))
        separate = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            separate[name] = run(model, "llama")
        mixed = run(model, "llama", adapter_names=["b", "a", "b"])
        for i, name in enumerate(["b", "a", "b"]):
            torch.testing.assert_close(mixed[i], separate[name][i], atol=1e-5, rtol=1e-5)
        plain = model.unload()
        assert not any("base_layer" in n for n, _ in plain.named_modules())


@pytest.mark.parametrize("arch,variant,norms", [
    ("llama", "pfeiffer", ["layers.1.input_layernorm", "layers.1.post_attention_layernorm"]),
    ("gpt2", "houlsby", ["h.1.ln_1", "h.1.ln_2"]),
    ("bert", "parallel", ["layer.1.attention.output.LayerNorm", "layer.1.output.LayerNorm"]),
])
def test_train_layernorms_trains_exactly_the_block_norms(arch, variant, norms, tiny_model):
    model = get_peft_model(tiny_model(arch), BottleneckConfig(variant=variant, bottleneck=4, train_layernorms=True,
                                                              layers_to_transform=[1]))
    trained_norms = {k.rsplit(".", 1)[0] for k in model.adapter_state_dict() if ".adapter_" not in k}
    assert len(trained_norms) == len(norms) and all(any(p.endswith("." + n) for n in norms) for p in trained_norms)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(t) for t in model.adapter_state_dict().values()}
    plain = model.unload()
    assert not any("base_layer" in n or "copies" in n for n, _ in plain.named_modules())


def test_layernorm_copies_serve_only_their_adapter_rows(tiny_model):
    model = get_peft_model(tiny_model("llama"), BottleneckConfig(bottleneck=4, train_layernorms=True), "a")
    model.add_adapter("b", BottleneckConfig(bottleneck=4))
    norm = "model.layers.0.post_attention_layernorm.weight"
    with torch.no_grad():
        model.adapter_state_dict("a")[norm].mul_(3.0)  # only a's copy changes
    with model.disable_adapter():
        base = run(model, "llama")
    model.set_adapter("b")
    only_b = run(model, "llama")
    model.set_adapter("a")
    only_a = run(model, "llama")
    mixed = run(model, "llama", adapter_names=[BASE, "a", "b"])
    torch.testing.assert_close(mixed[0], base[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], only_a[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], only_b[2], atol=1e-5, rtol=1e-5)
    assert (only_a[1] - base[1]).abs().max() > 1e-3

    inputs = make_inputs("llama")
    out = output_of(model(**inputs, adapter_names=[BASE, "a", BASE]), inputs)
    out[[0, 2]].pow(2).sum().backward()  # a loss on the base rows only
    grad = model.adapter_state_dict("a")[norm].grad
    assert grad is None or torch.count_nonzero(grad) == 0
    out = output_of(model(**inputs, adapter_names=[BASE, "a", BASE]), inputs)
    out[1].pow(2).sum().backward()  # and a loss on a's row reaches a's copy
    assert torch.count_nonzero(model.adapter_state_dict("a")[norm].grad) > 0


def test_not_mergeable_and_no_peft_format(tiny_model, tmp_path):
    model = get_peft_model(tiny_model("llama"), BottleneckConfig(bottleneck=4, train_layernorms=True))
    with pytest.raises(ConfigError, match=r"'default' \(bottleneck\) cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ConfigError, match="no Hugging Face PEFT equivalent; save it with format='peftlab'"):
        model.save_pretrained(tmp_path, format="peft")


def test_no_default_targets_is_a_clear_error():
    with pytest.raises(ConfigError, match="no default targets for Toy.*pass target_modules"):
        get_peft_model(Toy(), BottleneckConfig(bottleneck=2))


def test_bottleneck_size_must_be_positive_after_reduction(tiny_model):
    with pytest.raises(ConfigError, match=r"32 // reduction_factor=64 = 0; use reduction_factor <= 32"):
        get_peft_model(tiny_model("llama"), BottleneckConfig(reduction_factor=64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of bottleneck"),
    (dict(bottleneck=8, reduction_factor=4), "exactly one of bottleneck"),
    (dict(bottleneck=0), "bottleneck must be a positive int, got 0"),
    (dict(bottleneck=-3), "bottleneck must be a positive int"),
    (dict(reduction_factor=0), "reduction_factor must be a positive int"),
    (dict(reduction_factor=2.5), "reduction_factor must be a positive int"),
    (dict(bottleneck=8, activation="tanh"), "activation must be one of .* got 'tanh'"),
    (dict(bottleneck=8, variant="lora"), "variant must be one of .* got 'lora'"),
    (dict(bottleneck=8, init="xavier"), "init must be one of .* got 'xavier'"),
    (dict(bottleneck=8, scaling=float("nan")), "scaling must be a finite number"),
    (dict(bottleneck=8, target_modules="all-linear"), "'all-linear' would put an adapter after every projection"),
])
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BottleneckConfig(**kwargs)


def test_config_json_round_trip():
    cfg = BottleneckConfig(variant="parallel", reduction_factor=8, activation="swish", scaling=4.0,
                           train_layernorms=True, target_modules=["mlp"])
    assert BottleneckConfig.from_json(cfg.to_json()) == cfg
