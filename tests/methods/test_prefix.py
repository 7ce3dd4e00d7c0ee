"""Prefix tuning / P-tuning v2 against Hugging Face PEFT (the oracle) and its own promises."""

import peft
import pytest
import torch

from peftlab import ConfigError, PeftModel, PrefixTuningConfig, get_peft_model
from peftlab.models import tiny
from tests.conftest import make_inputs, output_of

ARCHS = {"llama": ("causal-lm", "CAUSAL_LM"), "gpt2": ("causal-lm", "CAUSAL_LM"), "bert": ("seq-cls", "SEQ_CLS")}


def logits(model, arch):
    inputs = make_inputs(arch)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])  # PEFT's forward counts pads as positions
    with torch.no_grad():
        return output_of(model(**inputs), inputs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("projection", [True, False])
def test_peft_prefix_loads_in_peftlab(arch, projection, tmp_path):
    task, task_type = ARCHS[arch]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny(arch, task).eval(), peft.PrefixTuningConfig(
        num_virtual_tokens=4, prefix_projection=projection, task_type=task_type))
    expected = logits(theirs, arch)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny(arch, task).eval(), tmp_path)
    assert (logits(ours, arch) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_peftlab_prefix_loads_in_peft_and_mlp_is_dropped(arch, tmp_path):
    task, task_type = ARCHS[arch]
    ours = get_peft_model(tiny(arch, task).eval(), PrefixTuningConfig(num_virtual_tokens=4, task_type=task_type))
    expected = logits(ours, arch)
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny(arch, task).eval(), tmp_path)
    assert (logits(theirs, arch) - expected).abs().max() <= 1e-5
    back = PeftModel.from_pretrained(tiny(arch, task).eval(), tmp_path, is_trainable=True)
    state = back.adapter_state_dict()
    assert set(state) == {"embedding.weight"} | ({"classifier.weight", "classifier.bias"} if arch == "bert" else set())
    assert state["embedding.weight"].requires_grad, "the loaded table keeps training without the MLP"


def test_gqa_table_uses_kv_heads():
    model = get_peft_model(tiny("llama", "causal-lm"), PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=False))
    # 2 layers x (key, value) x 2 kv heads x head_dim 8 (not 4 query heads)
    assert model.adapter_state_dict()["embedding.weight"].shape == (5, 2 * 2 * 2 * 8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_cache_equals_without(arch):
    torch.manual_seed(0)
    model = get_peft_model(tiny(arch, "causal-lm").eval(), PrefixTuningConfig(num_virtual_tokens=3))
    ids = make_inputs(arch)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    cached = model.generate(input_ids=ids, use_cache=True, **kw)
    uncached = model.generate(input_ids=ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_text_positions_start_after_the_prefix():
    """With a P-token prefix the text sits at positions P.. (what PEFT's cache route gives)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny("gpt2", "causal-lm").eval(), PrefixTuningConfig(num_virtual_tokens=4))
    seen = {}
    wpe = model.base_model.transformer.wpe
    handle = wpe.register_forward_hook(lambda m, args, out: seen.update(pos=args[0].clone()))  # returns None
    model(input_ids=torch.tensor([[5, 6, 7]]))
    handle.remove()
    assert seen["pos"].tolist() == [[4, 5, 6]]


def test_encoder_decoder_refused_with_reason():
    with pytest.raises(ConfigError, match="encoder-decoder.*cross-attention"):
        get_peft_model(tiny("t5", "seq2seq"), PrefixTuningConfig())


def test_unload_restores_attention_implementation():
    base = tiny("llama", "causal-lm")
    impl = base.config._attn_implementation
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=2))
    assert base.config._attn_implementation == f"peftlab_{impl}"
    plain = model.unload()
    assert plain.config._attn_implementation == impl and not plain._forward_pre_hooks
    assert not any(hasattr(m, "_peftlab_site") for m in plain.modules())
