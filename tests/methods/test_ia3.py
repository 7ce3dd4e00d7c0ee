"""(IA)³ against its closed form: output scaling h = (W x + b) ⊙ l, input scaling h = W (x ⊙ l) + b."""

import re

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from peftlab import BASE, ConfigError, IA3Config, get_peft_model
from tests.conftest import make_inputs


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5)
        self.conv = Conv1D(4, 5)  # GPT-2 layout: weight (in=5, out=4)

    def forward(self, x):
        return self.conv(self.lin(x))


def vectors(model):
    return {k.removesuffix(".ia3_l"): v.detach() for k, v in model.adapter_state_dict().items()}


X = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("ff", [[], ["lin"], ["conv"], ["lin", "conv"]])
def test_forward_matches_closed_form(ff):
    toy = Toy()
    lin_w, lin_b, conv_w, conv_b = (t.detach().clone()
                                    for t in (toy.lin.weight, toy.lin.bias, toy.conv.weight, toy.conv.bias))
    model = get_peft_model(toy, IA3Config(target_modules=["lin", "conv"], feedforward_modules=ff,
                                          init_ia3_weights=False))
    v = vectors(model)
    # Hugging Face PEFT's layout: (1, d_in) when the input is scaled, (d_out, 1) when the output is.
    assert v["lin"].shape == ((1, 6) if "lin" in ff else (5, 1))
    assert v["conv"].shape == ((1, 5) if "conv" in ff else (4, 1))
    l_lin, l_conv = v["lin"].flatten(), v["conv"].flatten()
    with torch.no_grad():
        h = (X * l_lin) @ lin_w.T + lin_b if "lin" in ff else (X @ lin_w.T + lin_b) * l_lin
        expected = (h * l_conv) @ conv_w + conv_b if "conv" in ff else (h @ conv_w + conv_b) * l_conv
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=1e-5)


def test_default_init_is_ones_and_identity():
    toy = Toy()
    with torch.no_grad():
        expected = toy(X)
    model = get_peft_model(toy, IA3Config(target_modules=["lin", "conv"], feedforward_modules=["conv"]))
    assert all(torch.equal(t, torch.ones_like(t)) for t in vectors(model).values())
    with torch.no_grad():
        assert torch.equal(model(X), expected)


@pytest.mark.parametrize("ff", [[], ["lin", "conv"]])
def test_merge_is_exact_including_bias(ff):
    toy = Toy()
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    model = get_peft_model(toy, IA3Config(target_modules=["lin", "conv"], feedforward_modules=ff,
                                          init_ia3_weights=False))
    v = vectors(model)
    with torch.no_grad():
        unmerged = model(X)
        model.merge_adapter()
        base = model.base_model
        lin, conv = base.lin.base_layer, base.conv.base_layer
        if ff:  # W diag(l): columns of (out, in), rows of Conv1D's (in, out); bias untouched
            torch.testing.assert_close(lin.weight, before["lin.weight"] * v["lin"], atol=0, rtol=0)
            torch.testing.assert_close(conv.weight, before["conv.weight"] * v["conv"].T, atol=0, rtol=0)
            torch.testing.assert_close(lin.bias, before["lin.bias"], atol=0, rtol=0)
            torch.testing.assert_close(conv.bias, before["conv.bias"], atol=0, rtol=0)
        else:  # diag(l) W and l ⊙ b
            torch.testing.assert_close(lin.weight, before["lin.weight"] * v["lin"], atol=0, rtol=0)
            torch.testing.assert_close(conv.weight, before["conv.weight"] * v["conv"].T, atol=0, rtol=0)
            torch.testing.assert_close(lin.bias, before["lin.bias"] * v["lin"].flatten(), atol=0, rtol=0)
            torch.testing.assert_close(conv.bias, before["conv.bias"] * v["conv"].flatten(), atol=0, rtol=0)
        torch.testing.assert_close(model(X), unmerged, atol=1e-6, rtol=1e-5)
        model.merge_adapter()  # idempotent
        torch.testing.assert_close(lin.weight, before["lin.weight"] * v["lin"], atol=0, rtol=0)
        model.unmerge_adapter()
        for key in ("lin.weight", "lin.bias", "conv.weight", "conv.bias"):
            layer = getattr(base, key.split(".")[0]).base_layer
            torch.testing.assert_close(getattr(layer, key.split(".")[1]), before[key], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(model(X), unmerged, atol=1e-6, rtol=1e-5)


def test_delta_weight_is_the_additive_view_of_a_merge():
    model = get_peft_model(Toy(), IA3Config(target_modules=["lin", "conv"], feedforward_modules=["conv"],
                                            init_ia3_weights=False))
    layers = dict(model.adapter_layers())
    with torch.no_grad():
        expected = {p: layer.base_weight + layer.delta_weight("default") for p, layer in layers.items()}
        model.merge_adapter()
        for p, layer in layers.items():
            torch.testing.assert_close(layer.base_weight, expected[p], atol=1e-6, rtol=1e-6)


def test_merge_refuses_a_zero_entry():
    model = get_peft_model(Toy(), IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False))
    with torch.no_grad():
        model.adapter_state_dict()["lin.ia3_l"][2, 0] = 0.0
    with pytest.raises(ValueError, match="zero or non-finite"):
        model.merge_adapter()


def test_stacked_active_adapters_multiply():
    model = get_peft_model(Toy(), IA3Config(target_modules=["lin"], feedforward_modules=["lin"],
                                            init_ia3_weights=False), "a")
    model.add_adapter("b", IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False))
    model.add_adapter("c", IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False))
    la, lb, lc = (model.adapter_state_dict(n)["lin.ia3_l"].detach().flatten() for n in "abc")
    lin = model.base_model.lin.base_layer
    model.set_adapter(["a", "b", "c"])
    with torch.no_grad():
        torch.testing.assert_close(model.base_model.lin(X), lin(X * la) * (lb * lc), atol=1e-6, rtol=1e-5)


def test_mixed_batch_with_both_roles_on_one_layer():
    model = get_peft_model(Toy(), IA3Config(target_modules=["lin", "conv"], feedforward_modules=["lin"],
                                            init_ia3_weights=False), "a")
    model.add_adapter("b", IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False))
    model.add_adapter("c", IA3Config(target_modules=["conv"], feedforward_modules=["conv"], init_ia3_weights=False))
    x = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(2))
    rows = ["b", "a", BASE, "c", "a"]
    with torch.no_grad():
        mixed = model(x, adapter_names=rows)
        separate = {}
        for name in "abc":
            model.set_adapter(name)
            separate[name] = model(x)
        with model.disable_adapter():
            separate[BASE] = model(x)
        # Rows of the same batch with the stack "a"+"b" need their own product, not a mixture.
        model.set_adapter(["a", "b"])
        both = model(x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], separate[name][i], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(both, separate["a"])


_T5 = {f"{stack}.block.N.layer.N.{m}": m.endswith("wo") for stack in ("encoder", "decoder")
       for m in ("SelfAttention.k", "SelfAttention.v", "DenseReluDense.wo")}
_T5.update({f"decoder.block.N.layer.N.EncDecAttention.{m}": False for m in ("k", "v")})
DEFAULT_TARGETS = {  # layer index replaced by N -> is the input scaled (feedforward)?
    "llama": {"model.layers.N.self_attn.k_proj": False, "model.layers.N.self_attn.v_proj": False,
              "model.layers.N.mlp.down_proj": True},
    "gpt2": {"transformer.h.N.attn.c_attn": False, "transformer.h.N.mlp.c_proj": True},
    # Only the FFN output dense, never attention.output.dense (Hugging Face PEFT's default hits both).
    "bert": {"bert.encoder.layer.N.attention.self.key": False, "bert.encoder.layer.N.attention.self.value": False,
             "bert.encoder.layer.N.output.dense": True},
    "t5": _T5,
}


@pytest.mark.parametrize("arch", sorted(DEFAULT_TARGETS))
def test_default_targets_per_architecture(arch, tiny_model):
    model = get_peft_model(tiny_model(arch), IA3Config())
    layers = [(p, layer) for p, layer in model.adapter_layers() if type(layer).__name__ == "IA3Layer"]
    found = {re.sub(r"\.\d+\.", ".N.", p): layer.feedforward["default"] for p, layer in layers}
    assert found == DEFAULT_TARGETS[arch]
    assert len(layers) == 2 * len(found)  # every one of the 2 layers (per stack) is hit
    for path, layer in layers:
        shape = (1, layer.in_features) if layer.feedforward["default"] else (layer.out_features, 1)
        assert model.adapter_state_dict()[f"{path}.ia3_l"].shape == shape


def test_default_model_trains_and_changes_output(tiny_model):
    model = get_peft_model(tiny_model("llama"), IA3Config())
    trainable, _ = model.trainable_parameters()
    assert trainable == 2 * (2 * 16 + 64)  # per layer: k and v outputs (2 kv heads × 8), down_proj input (64)
    out = model(**make_inputs("llama")).logits
    out.pow(2).mean().backward()
    assert all(t.grad is not None for t in model.adapter_state_dict().values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(feedforward_modules="all-linear"), "not meaningful"),
    (dict(feedforward_modules="(unclosed"), "not a valid regular expression"),
    (dict(init_ia3_weights="ones"), "init_ia3_weights must be True or False"),
    (dict(target_modules="(unclosed"), "not a valid regular expression"),
])
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        IA3Config(**kwargs)


def test_feedforward_must_be_a_target():
    with pytest.raises(ConfigError, match=r"feedforward_modules entries \['up_proj'\] match none"):
        get_peft_model(Toy(), IA3Config(target_modules=["lin"], feedforward_modules=["up_proj"]))


def test_unknown_architecture_needs_targets_and_feedforward():
    with pytest.raises(ConfigError, match="target_modules is not set"):
        get_peft_model(Toy(), IA3Config())
    with pytest.raises(ConfigError, match="feedforward_modules is not set and there is no default"):
        get_peft_model(Toy(), IA3Config(target_modules=["lin"]))
