"""PeftModel API behaviour and every bad input it must refuse with a clear message."""

import json
import os

import pytest
import torch

from peftlab import AdapterLoadError, LoraConfig, PeftModel, RoutingError, get_peft_model
from tests.conftest import make_inputs, output_of

LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def logits(model, arch="llama", **kw):
    inputs = make_inputs(arch)
    with torch.no_grad():
        return output_of(model(**inputs, **kw), inputs)


def test_base_frozen_and_trainable_report(tiny_model, capsys):
    model = get_peft_model(tiny_model("llama"), LORA)
    trainable, total = model.trainable_parameters()
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads x 8); r=4; 2 layers.
    assert trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert total == trainable + sum(p.numel() for p in tiny_model("llama").parameters())
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"trainable params: {trainable:,d}" in out and "trainable%" in out


def test_config_and_attrs_pass_through(tiny_model):
    base = tiny_model("llama")
    model = get_peft_model(base, LORA)
    assert model.config is base.config
    assert model.get_input_embeddings() is base.get_input_embeddings()


def test_duplicate_adapter_name(tiny_model):
    model = get_peft_model(tiny_model("llama"), LORA)
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        model.add_adapter("default", LORA)


@pytest.mark.parametrize("name", ["", "a.b", "../x", "__base__", "-x", "a/b"])
def test_invalid_adapter_names(tiny_model, name):
    model = get_peft_model(tiny_model("llama"), LORA)
    with pytest.raises(RoutingError, match="invalid adapter name"):
        model.add_adapter(name, LORA)


def test_unknown_adapter_in_set_adapter_and_adapter_names(tiny_model):
    model = get_peft_model(tiny_model("llama"), LORA)
    with pytest.raises(RoutingError, match="unknown adapter 'nope'; adapters: \\['default'\\]"):
        model.set_adapter("nope")
    with pytest.raises(RoutingError, match="unknown adapter 'nope'"):
        logits(model, adapter_names=["default", "nope", "default"])
    with pytest.raises(RoutingError, match="3 rows"):
        logits(model, adapter_names=["default"])
    with pytest.raises(RoutingError, match="one name per row"):
        logits(model, adapter_names="default")


def test_target_matches_nothing_lists_linear_modules(tiny_model):
    with pytest.raises(ValueError, match=r"matched no .* self_attn.q_proj.*mlp.down_proj|mlp.down_proj.*self_attn.q_proj"):
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["query"]))


def test_delete_adapter_and_active(tiny_model):
    model = get_peft_model(tiny_model("llama"), LORA, "a")
    model.add_adapter("b", LORA)
    assert model.active_adapter == "a"
    model.set_adapter("b")
    model.delete_adapter("b")
    assert list(model.peft_config) == ["a"] and model.adapter_paths("b") == []
    assert model.active_adapters == []


def test_unload_restores_plain_modules(tiny_model):
    base = tiny_model("llama")
    types_before = {n: type(m) for n, m in base.named_modules()}
    expected = logits(base)
    model = get_peft_model(base, LORA)
    plain = model.unload()
    assert {n: type(m) for n, m in plain.named_modules()} == types_before
    torch.testing.assert_close(logits(plain), expected, atol=0, rtol=0)


def test_merged_adapter_blocks_mixed_route_and_disable(tiny_model):
    model = get_peft_model(tiny_model("llama"), LORA)
    model.merge_adapter()
    with pytest.raises(RoutingError, match="unmerge_adapter"):
        logits(model, adapter_names=["default"] * 3)
    with pytest.raises(RoutingError, match="unmerge_adapter"):
        with model.disable_adapter():
            pass


def test_non_default_adapters_saved_in_subfolders(tiny_model, tmp_path):
    model = get_peft_model(tiny_model("llama"), LORA)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], "temporary files left behind"
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    model.set_adapter("other")
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    assert loaded.trainable_parameters()[0] == 0, "from_pretrained loads for inference unless is_trainable=True"


def test_load_onto_base_with_other_shapes_names_tensor_and_shapes(tiny_model, tmp_path):
    from peftlab.models import tiny

    get_peft_model(tiny_model("llama"), LORA).save_pretrained(tmp_path)
    other = tiny("llama", "causal-lm", seed=0)
    other_cfg = other.config
    other_cfg.hidden_size = 48
    wider = type(other)(other_cfg)
    base = tiny_model("llama")
    with pytest.raises(AdapterLoadError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: file has shape \(4, 32\), model expects \(4, 48\)"):
        PeftModel.from_pretrained(wider, tmp_path)
    # A failed load leaves the caller's model unwrapped.
    assert not any("base_layer" in n for n, _ in wider.named_modules())
    PeftModel.from_pretrained(base, tmp_path)  # the right base still loads


def test_adapter_dir_missing_files(tiny_model, tmp_path):
    with pytest.raises(AdapterLoadError, match="does not exist"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "nope")
    with pytest.raises(AdapterLoadError, match="has no adapter_config.json"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    get_peft_model(tiny_model("llama"), LORA).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match="no adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_corrupt_safetensors(tiny_model, tmp_path):
    get_peft_model(tiny_model("llama"), LORA).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_unknown_config_field_in_file(tiny_model, tmp_path):
    get_peft_model(tiny_model("llama"), LORA).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["rank"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match=r"unknown field\(s\) \['rank'\]"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_pickle_adapter_refused_unless_opted_in(tiny_model, tmp_path):
    model = get_peft_model(tiny_model("llama"), LORA)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle .* allow_pickle=True"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, allow_pickle=True)
    torch.testing.assert_close(logits(loaded), expected, atol=0, rtol=0)


def test_merging_into_a_tied_embedding_unties_it():
    # SmolLM2 ties lm_head to embed_tokens; ΔW of an embedding adapter must not reach the head.
    from transformers import AutoModelForCausalLM

    from peftlab.models import tiny

    config = tiny("llama", "causal-lm").config
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    head_before = model.lm_head.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        assert (merged(input_ids=ids).logits - expected).abs().max() <= 1e-5
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert torch.equal(merged.lm_head.weight, head_before)
    assert merged.config.tie_word_embeddings is False
