"""Interop with Hugging Face PEFT (the oracle): same weights give the same logits, both ways."""

import json

import peft
import pytest
import torch

from peftlab import LoraConfig, PeftModel, get_peft_model
from tests.conftest import make_inputs, output_of

ARCHS = ["llama", "gpt2", "bert", "t5"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc", "wte"],
           "bert": ["query", "value", "dense"], "t5": ["q", "v", "wi", "wo"]}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def logits(model, arch):
    inputs = make_inputs(arch)
    with torch.no_grad():
        return output_of(model(**inputs), inputs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("target", ["list", "all-linear"])
def test_peftlab_adapter_loads_in_peft(arch, target, tiny_model, tmp_path):
    targets = TARGETS[arch] if target == "list" else "all-linear"
    ours = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=6, target_modules=targets,
                                                       init_lora_weights=False, task_type=TASK[arch]))
    expected = logits(ours, arch)
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    saved_by_peft = {k.removeprefix("base_model.model.") for k in peft.get_peft_model_state_dict(theirs)}
    assert set(ours.adapter_state_dict()) == saved_by_peft - {k for k in saved_by_peft if ".base_layer." in k}
    assert (logits(theirs, arch) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_peftlab(arch, rslora, tiny_model, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS[arch], init_lora_weights=False,
                          use_rslora=rslora, task_type=TASK[arch])
    theirs = peft.get_peft_model(tiny_model(arch), cfg)
    # Hugging Face PEFT seeds B with zeros even for init_lora_weights=False on some layer types:
    # randomise every LoRA tensor so the comparison cannot pass on zeros.
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    expected = logits(theirs, arch)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert ours.peft_config["default"].use_rslora is rslora
    assert (logits(ours, arch) - expected).abs().max() <= 1e-5


def test_hf_config_roundtrip_fields(tiny_model, tmp_path):
    ours = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=6, lora_dropout=0.1,
                                                          target_modules=["q_proj"], layers_to_transform=[1]))
    ours.save_pretrained(tmp_path, format="peft")
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 4 and data["lora_alpha"] == 6
    assert data["layers_to_transform"] == [1] and data["target_modules"] == ["q_proj"]
    back = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert back.adapter_paths("default") == ["model.layers.1.self_attn.q_proj"]
    assert back.peft_config["default"].lora_dropout == 0.1


def test_all_linear_export_lists_adapted_layers_not_heads(tiny_model, tmp_path):
    ours = get_peft_model(tiny_model("bert"), LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    ours.save_pretrained(tmp_path, format="peft")
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "classifier" not in data["target_modules"] and {"query", "key", "value", "dense"} <= set(data["target_modules"])


def test_unsupported_peft_option_is_refused(tiny_model, tmp_path):
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      rank_pattern={"v_proj": 2}))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rank_pattern"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


# -- DoRA ------------------------------------------------------------------------------------------
def randomise(model):
    """Random LoRA factors and magnitudes off their initial norms (so DoRA's f ≠ 1 everywhere)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def peft_key(name: str) -> str:
    """Hugging Face PEFT's parameter name → our adapter_state_dict key."""
    key = name.removeprefix("base_model.model.").replace(".default", "")
    return key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # nn.Linear, GPT-2 Conv1D, and both embeddings
def test_dora_matches_peft_logits_gradients_and_a_training_step(arch, tiny_model, tmp_path):
    """Same weights, same dropout masks (same seed): same logits, same gradients of A, B and the
    magnitude — dropout active, so PEFT's W x̃ direction term is matched too — and the same model
    after an SGD step."""
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS[arch], init_lora_weights=False, use_dora=True,
                          lora_dropout=0.2, task_type=TASK[arch])
    theirs = peft.get_peft_model(tiny_model(arch), cfg).eval()  # PEFT leaves its new model in training mode
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model(arch), tmp_path, is_trainable=True).eval()
    assert ours.peft_config["default"].use_dora is True
    assert (logits(ours, arch) - logits(theirs, arch)).abs().max() <= 1e-5

    inputs = make_inputs(arch)
    theirs_params = {peft_key(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    ours_params = ours.adapter_state_dict()
    assert set(theirs_params) == set(ours_params)
    outs = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(0)
        out = output_of(model(**inputs), inputs)
        out.pow(2).mean().backward()
        outs.append(out.detach())
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert (outs[1] - logits(ours, arch)).abs().max() > 1e-4, "dropout should be active in training"
    for key, p in ours_params.items():
        torch.testing.assert_close(p.grad, theirs_params[key].grad, atol=1e-5, rtol=1e-5, msg=key)
    for params in (theirs_params, ours_params):
        torch.optim.SGD(params.values(), lr=0.5).step()
    for model in (theirs, ours):
        model.eval()
    assert (logits(ours, arch) - logits(theirs, arch)).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_peftlab_dora_adapter_loads_in_peft(arch, tiny_model, tmp_path):
    ours = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS[arch],
                                                       init_lora_weights=False, use_dora=True, task_type=TASK[arch]))
    randomise(ours)
    expected = logits(ours, arch)
    ours.save_pretrained(tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    saved_by_peft = {k.removeprefix("base_model.model.") for k in peft.get_peft_model_state_dict(theirs)}
    assert set(ours.adapter_state_dict()) == saved_by_peft - {k for k in saved_by_peft if ".base_layer." in k}
    assert (logits(theirs, arch) - expected).abs().max() <= 1e-5
