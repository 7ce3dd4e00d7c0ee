import pytest

from peftlab import ConfigError, LoHaConfig, LoraConfig, get_peft_model
from peftlab.targeting import describe, find_targets, layer_index


def targets(model, **kw):
    return find_targets(model, LoraConfig(**kw))


def test_exact_suffix_and_regex(tiny_model):
    m = tiny_model("llama")
    assert targets(m, target_modules=["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert targets(m, target_modules=["self_attn.q_proj"]) == targets(m, target_modules=["q_proj"])
    assert targets(m, target_modules=["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert targets(m, target_modules=r".*\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError):  # "proj" is not a dotted suffix of "q_proj"
        targets(m, target_modules=["proj"])


@pytest.mark.parametrize("arch,head", [("llama", "lm_head"), ("gpt2", "lm_head"), ("bert", "classifier"), ("t5", "lm_head")])
def test_all_linear_skips_the_head(tiny_model, arch, head):
    m = tiny_model(arch)
    found = targets(m, target_modules="all-linear")
    assert found and not any(p.split(".")[-1] == head for p in found)
    if arch == "gpt2":
        assert "transformer.h.0.attn.c_attn" in found  # Conv1D counts as linear


def test_exclude_and_layers(tiny_model):
    m = tiny_model("llama")
    found = targets(m, target_modules="all-linear", exclude_modules=["k_proj", "mlp.gate_proj"], layers_to_transform=[1])
    assert all(layer_index(p) == 1 for p in found)
    assert not any(p.endswith(("k_proj", "gate_proj")) for p in found)
    assert len(found) == 5
    gpt = tiny_model("gpt2")
    assert targets(gpt, target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h") == ["transformer.h.0.attn.c_attn"]


def test_wrapped_modules_seen_at_original_path(tiny_model):
    m = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    assert targets(m.base_model, target_modules=["q_proj"]) == m.adapter_paths("default")
    assert not any("lora" in p or "base_layer" in p for p in targets(m.base_model, target_modules="all-linear"))


def test_describe(tiny_model):
    info = describe(tiny_model("llama"))
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (2, 4, 2, 8)
    assert info.layer_paths == ("model.layers.0", "model.layers.1")
    assert describe(tiny_model("gpt2")).layer_paths == ("transformer.h.0", "transformer.h.1")


def test_query_value_defaults_agree_with_peft_where_both_list_the_architecture():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_LORA

    from peftlab.targeting import QUERY_VALUE

    shared = [t for t in QUERY_VALUE if t in PEFT_LORA]
    assert len(shared) >= 15
    assert {t: set(QUERY_VALUE[t]) for t in shared} == {t: set(PEFT_LORA[t]) for t in shared}


@pytest.mark.parametrize("arch,expected", [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}),
                                           ("bert", {"query", "value"}), ("t5", {"q", "v"})])
@pytest.mark.parametrize("config_cls", [LoraConfig, LoHaConfig])
def test_low_rank_methods_default_to_query_and_value(arch, expected, config_cls, tiny_model):
    model = get_peft_model(tiny_model(arch), config_cls(r=2))
    module_paths = {key.split(".lora_")[0].split(".hada_")[0] for key in model.adapter_state_dict()}
    assert {path.rsplit(".", 1)[-1] for path in module_paths} == expected
