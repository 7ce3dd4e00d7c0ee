"""(IA)³ and LoHa interop with Hugging Face PEFT (the oracle): same weights give the same logits,
both ways, and the same merged weights."""

import json

import peft
import pytest
import torch

from peftlab import ConfigError, IA3Config, LoHaConfig, PeftModel, get_peft_model
from tests.conftest import make_inputs, output_of

ARCHS = ["llama", "gpt2", "bert", "t5"]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
# Explicit (IA)³ targets with input scaling on layers of both orientations.
IA3_TARGETS = {"llama": (["q_proj", "v_proj", "down_proj"], ["v_proj", "down_proj"]),
               "gpt2": (["c_attn", "c_fc", "mlp.c_proj"], ["c_attn"]),
               "bert": (["query", "value", "intermediate.dense", "output.dense"], ["value", "intermediate.dense"]),
               "t5": (["q", "v", "wi", "wo"], ["wo"])}
# PEFT's LoHa wraps nn.Linear only, not GPT-2's Conv1D: there the head is the one linear layer.
LOHA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["lm_head"],
                "bert": ["query", "value", "dense"], "t5": ["q", "v", "wi", "wo"]}


def logits(model, arch):
    inputs = make_inputs(arch)
    with torch.no_grad():
        return output_of(model(**inputs), inputs)


def assert_same_keys(ours, theirs):
    saved_by_peft = {k.removeprefix("base_model.model.") for k in peft.get_peft_model_state_dict(theirs)}
    assert set(ours.adapter_state_dict()) == saved_by_peft - {k for k in saved_by_peft if ".base_layer." in k}


def randomize(theirs, prefix):
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if prefix in n:
                p.normal_(1.0 if prefix == "ia3_" else 0.0, 0.3)


def merged_weights(model):
    return {k.replace(".base_layer", ""): v for k, v in model.merge_and_unload().state_dict().items()}


# -- (IA)³ ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("targets", ["default", "list"])
def test_peftlab_ia3_loads_in_peft(arch, targets, tiny_model, tmp_path):
    kw = {} if targets == "default" else dict(zip(("target_modules", "feedforward_modules"), IA3_TARGETS[arch]))
    ours = get_peft_model(tiny_model(arch), IA3Config(init_ia3_weights=False, task_type=TASK[arch], **kw))
    expected = logits(ours, arch)
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert_same_keys(ours, theirs)
    assert (logits(theirs, arch) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("targets", ["default", "list"])
def test_peft_ia3_loads_in_peftlab_and_merges_the_same(arch, targets, tiny_model, tmp_path):
    kw = {} if targets == "default" else dict(zip(("target_modules", "feedforward_modules"), IA3_TARGETS[arch]))
    theirs = peft.get_peft_model(tiny_model(arch), peft.IA3Config(task_type=TASK[arch], **kw))
    randomize(theirs, "ia3_")
    expected = logits(theirs, arch)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert_same_keys(ours, theirs)
    assert (logits(ours, arch) - expected).abs().max() <= 1e-5
    # Merging: the same rescaled weights and biases (bias only for output scaling).
    with torch.no_grad():
        ours_w, theirs_w = merged_weights(ours), merged_weights(theirs)
    assert ours_w.keys() == theirs_w.keys()
    for k in ours_w:
        torch.testing.assert_close(ours_w[k], theirs_w[k], atol=1e-6, rtol=1e-6)


def test_bert_default_differs_from_peft_only_in_attention_output(tiny_model, tmp_path):
    """PEFT's BERT default "output.dense" also hits attention.output.dense; ours is the FFN only,
    and a PEFT config written by us pins that down with full paths."""
    ours = get_peft_model(tiny_model("bert"), IA3Config(task_type="SEQ_CLS"))
    ours.save_pretrained(tmp_path, format="peft")
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "bert.encoder.layer.0.output.dense" in data["target_modules"]
    assert not any("attention.output" in t for t in data["target_modules"])
    assert data["feedforward_modules"] == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    theirs = peft.get_peft_model(tiny_model("bert"), peft.IA3Config(task_type="SEQ_CLS"))
    theirs_paths = {k.removeprefix("base_model.model.") for k in peft.get_peft_model_state_dict(theirs)}
    assert theirs_paths - set(ours.adapter_state_dict()) == {
        f"bert.encoder.layer.{i}.attention.output.dense.ia3_l" for i in range(2)}


def test_ia3_leaf_names_when_they_are_exact(tiny_model, tmp_path):
    ours = get_peft_model(tiny_model("llama"), IA3Config())
    ours.save_pretrained(tmp_path, format="peft")
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "IA3"
    assert data["target_modules"] == ["down_proj", "k_proj", "v_proj"] and data["feedforward_modules"] == ["down_proj"]


# -- LoHa -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["materialize", "factored"])
def test_peftlab_loha_loads_in_peft(arch, mode, tiny_model, tmp_path):
    ours = get_peft_model(tiny_model(arch), LoHaConfig(r=3, alpha=5, target_modules=LOHA_TARGETS[arch],
                                                       init_weights=False, task_type=TASK[arch], forward_mode=mode))
    expected = logits(ours, arch)
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert_same_keys(ours, theirs)
    assert (logits(theirs, arch) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loha_loads_in_peftlab_and_merges_the_same(arch, tiny_model, tmp_path):
    cfg = peft.LoHaConfig(r=3, alpha=5, target_modules=LOHA_TARGETS[arch], init_weights=False, task_type=TASK[arch])
    theirs = peft.get_peft_model(tiny_model(arch), cfg)
    randomize(theirs, "hada_")
    expected = logits(theirs, arch)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert ours.peft_config["default"].r == 3 and ours.peft_config["default"].alpha == 5
    assert_same_keys(ours, theirs)
    assert (logits(ours, arch) - expected).abs().max() <= 1e-5
    with torch.no_grad():
        ours_w, theirs_w = merged_weights(ours), merged_weights(theirs)
    # gpt2's lm_head is tied to wte: peft merges ΔW into the shared tensor, so its input embedding
    # changes too; peftlab unties first and keeps the embedding (tests/test_model.py).
    untied = {"transformer.wte.weight"} if arch == "gpt2" else set()
    for k in ours_w.keys() - untied:
        torch.testing.assert_close(ours_w[k], theirs_w[k], atol=1e-6, rtol=1e-6)
    for k in untied:
        torch.testing.assert_close(ours_w[k], tiny_model(arch).state_dict()[k])


def test_loha_on_conv1d_is_refused_for_peft_format(tiny_model, tmp_path):
    ours = get_peft_model(tiny_model("gpt2"), LoHaConfig(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match="not GPT-2's Conv1D"):
        ours.save_pretrained(tmp_path, format="peft")


def test_loha_unsupported_peft_option_is_refused(tiny_model, tmp_path):
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoHaConfig(r=2, target_modules=["q_proj"],
                                                                      rank_pattern={"q_proj": 4}))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rank_pattern"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
