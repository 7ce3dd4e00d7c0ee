"""inspect_adapter against ΔW computed by hand from each method's formula."""

import json
import math

import pytest
import torch

from peftlab import (BottleneckConfig, ConfigError, IA3Config, LoHaConfig, LoraConfig, PromptTuningConfig,
                     get_peft_model)
from peftlab.inspection import effective_rank, inspect_adapter, numeric_rank, singular_values
from peftlab.models import tiny


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.base_model.state_dict().items()}


def check_against(report, model, expected_delta):
    """Every reported number against ΔW = expected_delta(path, layer) computed from the formula."""
    layers = dict(model.adapter_layers())
    assert [d.path for d in report.layers] == [p for p, _ in model.adapter_layers()]
    for row in report.layers:
        layer = layers[row.path]
        delta = expected_delta(row.path, layer).double()
        weight = layer.base_weight.detach().double()
        assert row.shape == tuple(weight.shape)
        assert row.norm == pytest.approx(float(delta.norm()), rel=1e-6)
        assert row.relative_norm == pytest.approx(float(delta.norm() / weight.norm()), rel=1e-6)
        assert row.merge_error <= 1e-5 and row.unmerge_error <= 1e-5
        assert row.parameters == sum(t.numel() for t in layer.adapter_state("default").values())


def test_effective_rank_closed_form():
    # σ = (3, 1, 0): p = (3/4, 1/4), H = -(3/4 ln 3/4 + 1/4 ln 1/4); the zero adds nothing.
    sigma = singular_values(torch.diag(torch.tensor([3.0, 1.0, 0.0])))
    assert numeric_rank(sigma, (3, 3), torch.float32) == 2
    assert effective_rank(sigma) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    # Equal singular values: exactly their number.
    assert effective_rank(singular_values(2 * torch.eye(5)[:, :3])) == pytest.approx(3.0)
    assert numeric_rank(singular_values(torch.zeros(4, 4)), (4, 4), torch.float32) == 0
    assert effective_rank(singular_values(torch.zeros(4, 4))) == 0.0


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "v_proj", "embed_tokens"]), ("gpt2", ["c_attn", "c_fc"])])
def test_lora_norms_ranks_and_counts(arch, targets):
    model = get_peft_model(tiny(arch, "causal-lm"), LoraConfig(r=3, lora_alpha=6, target_modules=targets,
                                                                 init_lora_weights=False))
    before = base_weights(model)
    report = inspect_adapter(model, "default")
    state = model.adapter_state_dict("default")

    def lora_delta(path, layer):
        a = state.get(f"{path}.lora_A.weight", state.get(f"{path}.lora_embedding_A"))
        b = state.get(f"{path}.lora_B.weight", state.get(f"{path}.lora_embedding_B"))
        delta = 2.0 * b.detach() @ a.detach()  # scaling = lora_alpha / r = 2
        return delta if delta.shape == layer.base_weight.shape else delta.T  # Conv1D, Embedding: (in, out)

    check_against(report, model, lora_delta)
    assert len(report.layers) == (5 if arch == "llama" else 4)  # per layer ×2, + the embedding
    for row in report.layers:
        assert row.numeric_rank == 3
        assert 1.0 < row.effective_rank <= 3.0
    assert all(torch.equal(before[k], v) for k, v in model.base_model.state_dict().items() if k in before)

    adapter_params = sum(t.numel() for t in state.values())
    assert report.adapter_parameters == {"default": adapter_params}
    assert report.total_parameters == model.trainable_parameters()[1]
    assert report.share == pytest.approx(adapter_params / report.total_parameters)
    assert report.notes == ()


def test_ia3_delta_is_w_times_l_minus_one():
    model = get_peft_model(tiny("llama", "causal-lm"), IA3Config(init_ia3_weights=False))
    state = model.adapter_state_dict("default")
    report = inspect_adapter(model, "default")

    def ia3_delta(path, layer):
        # (d_out, 1) scales rows (outputs), (1, d_in) columns (the FFN input of down_proj).
        return layer.base_weight.detach() * (state[f"{path}.ia3_l"].detach() - 1)

    check_against(report, model, ia3_delta)
    assert {row.path.rsplit(".", 1)[1] for row in report.layers} == {"k_proj", "v_proj", "down_proj"}


def test_loha_delta_is_hadamard_of_two_rank_r_products():
    model = get_peft_model(tiny("llama", "causal-lm"), LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"],
                                                                  init_weights=False))
    state = model.adapter_state_dict("default")
    report = inspect_adapter(model, "default")

    def loha_delta(path, layer):
        w1a, w1b, w2a, w2b = (state[f"{path}.{k}"].detach() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        return (w1a @ w1b) * (w2a @ w2b) * 2.0  # alpha / r

    check_against(report, model, loha_delta)
    for row in report.layers:
        assert row.numeric_rank <= 4 and row.effective_rank <= row.numeric_rank  # rank ≤ r²


def test_methods_without_a_weight_delta_get_one_line_each():
    prompt = get_peft_model(tiny("llama", "causal-lm"), PromptTuningConfig(num_virtual_tokens=3))
    report = inspect_adapter(prompt, "default")
    assert report.layers == ()
    assert report.notes == ("prompt: no weight delta (virtual tokens); 96 parameters",)  # 3 tokens × 32 wide
    assert "prompt: no weight delta (virtual tokens); 96 parameters" in report.render()

    bottleneck = get_peft_model(tiny("llama", "causal-lm"), BottleneckConfig(bottleneck=4))
    params = sum(t.numel() for t in bottleneck.adapter_state_dict("default").values())
    modules = len(bottleneck.adapter_layers("default"))
    assert inspect_adapter(bottleneck, "default").notes == (
        f"bottleneck: no weight delta (a computation added to {modules} module(s)); {params:,d} parameters",)


def test_classifier_head_copy_is_counted_and_named():
    model = get_peft_model(tiny("llama", "seq-cls", num_labels=3),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS", init_lora_weights=False))
    report = inspect_adapter(model, "default")
    assert [row.path.rsplit(".", 1)[1] for row in report.layers] == ["q_proj", "q_proj"]
    assert report.notes == ("modules_to_save: full trained copies of score; 96 parameters",)  # 3 labels × 32


def test_json_and_table_carry_the_same_numbers():
    model = get_peft_model(tiny("llama", "causal-lm"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=1, target_modules=["v_proj"]))
    report = inspect_adapter(model, "default")
    data = json.loads(report.to_json())
    assert [layer["norm"] for layer in data["layers"]] == [row.norm for row in report.layers]
    assert data["adapter_parameters"] == {"default": 2 * 2 * (32 + 32), "other": 2 * (32 + 16)}
    table = report.render().splitlines()
    assert table[0] == "adapter 'default': lora on LlamaForCausalLM, 2 module(s) with a weight delta"
    assert table[2].split()[:2] == ["model.layers.0.self_attn.q_proj", "32×32"]
    assert f"{report.layers[0].norm:.4g}" in table[2]
    assert table[-1].startswith("parameters: 'default' 256, 'other' 96; 'default' is ")


def test_unknown_adapter():
    model = get_peft_model(tiny("llama", "causal-lm"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"no adapter 'nope' on this model; adapters: \['default'\]"):
        inspect_adapter(model, "nope")
