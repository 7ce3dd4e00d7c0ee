"""Prefix tuning / P-tuning v2 against Hugging Face PEFT (the oracle) and its own promises."""

import copy

import peft
import pytest
import torch
import transformers

from peftlab import BASE, ConfigError, PeftModel, PrefixTuningConfig, get_peft_model
from peftlab.models import tiny
from tests.conftest import make_inputs, output_of

ARCHS = {"llama": ("causal-lm", "CAUSAL_LM"), "gpt2": ("causal-lm", "CAUSAL_LM"), "bert": ("seq-cls", "SEQ_CLS"),
         "t5": ("seq2seq", "SEQ_2_SEQ_LM")}


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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_generation_with_cache_equals_without(arch):
    torch.manual_seed(0)
    model = get_peft_model(tiny(arch, ARCHS[arch][0]).eval(), PrefixTuningConfig(num_virtual_tokens=3))
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


def test_a_deep_copy_shifts_positions_by_its_own_routes():
    """The position hook travels with copy.deepcopy: the copy's mixed rows read the copy's router
    (a hook closing over the original's router once shifted them by the original's route)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny("llama", "causal-lm").eval(), PrefixTuningConfig(num_virtual_tokens=3), adapter_name="a")
    model.add_adapter("b", PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=False))
    copied = copy.deepcopy(model)
    ids = make_inputs("llama")["input_ids"]
    with torch.no_grad():
        mixed = copied(input_ids=ids, adapter_names=["b", "a", "b"]).logits[:, -ids.shape[1]:]
        for name in ("a", "b"):
            model.set_adapter(name)
            single = model(input_ids=ids).logits[:, -ids.shape[1]:]
            rows = [i for i, n in enumerate(["b", "a", "b"]) if n == name]
            torch.testing.assert_close(mixed[rows], single[rows], atol=1e-5, rtol=1e-5)


# -- encoder-decoder (T5): Hugging Face PEFT's layout ---------------------------------------------
def t5(num_layers: int, num_decoder_layers: int | None = None, seed: int = 0):
    """A tiny T5 of any depth (peftlab.models.tiny has 2 layers, where slot 2i mod L is 0 for both)."""
    config = transformers.T5Config(vocab_size=100, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=num_layers,
                                   num_decoder_layers=num_decoder_layers, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(config).eval()


def test_t5_decoder_layer_i_reads_slot_2i_mod_L_as_peft_does(tmp_path):
    """Three layers tell the slots apart: PEFT's stacked-and-regrouped table gives layers 0, 1, 2
    slots 0, 2, 1 (slot 1 is what a plain "layer i reads slot i" would give layer 1)."""
    ours = get_peft_model(t5(3), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=False, task_type="SEQ_2_SEQ_LM"))
    assert ours.model_adapters["default"].slots == (0, 2, 1)
    with torch.no_grad():
        ours.model_adapters["default"].embedding.weight.normal_()
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(t5(3), tmp_path)
    ids, dec = torch.randint(3, 100, (2, 6)), torch.randint(3, 100, (2, 4))
    with torch.no_grad():
        expected = theirs(input_ids=ids, decoder_input_ids=dec).logits
        assert (ours(input_ids=ids, decoder_input_ids=dec).logits - expected).abs().max() <= 1e-5


def test_t5_generation_matches_peft(tmp_path):
    """Every decoding step: the prefix is PEFT's cache, ours is added per call; same scores."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny("t5", "seq2seq").eval(), peft.PrefixTuningConfig(
        num_virtual_tokens=4, prefix_projection=False, task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.mul_(3)  # so the prefix steers the greedy tokens
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny("t5", "seq2seq").eval(), tmp_path)
    inputs = make_inputs("t5")
    kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=5,
              do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected, got = theirs.generate(**kw), ours.generate(**kw)
    assert torch.equal(got.sequences, expected.sequences)
    assert (torch.stack(got.scores) - torch.stack(expected.scores)).abs().max() <= 1e-5
    with ours.disable_adapter():
        plain = ours.generate(**kw)
    assert (torch.stack(got.scores) - torch.stack(plain.scores)).abs().max() > 1e-3, "the prefix acts at every step"


def test_t5_encoder_gets_no_prefix():
    model = get_peft_model(tiny("t5", "seq2seq").eval(), PrefixTuningConfig(num_virtual_tokens=3))
    inputs = make_inputs("t5")
    with torch.no_grad():
        adapted = model(**inputs)
        with model.disable_adapter():
            plain = model(**inputs)
    assert torch.equal(adapted.encoder_last_hidden_state, plain.encoder_last_hidden_state)
    assert (adapted.logits - plain.logits).abs().max() > 1e-3


def t5_pair(seed: int = 0):
    torch.manual_seed(seed)  # the same adapter weights whenever it is called
    model = get_peft_model(tiny("t5", "seq2seq"), PrefixTuningConfig(num_virtual_tokens=3), adapter_name="a")
    model.add_adapter("b", PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=False))
    return model


def test_t5_gradient_checkpointing_same_gradients_mixed_route():
    results = []
    for checkpointing in (False, True):
        model = t5_pair()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        inputs = make_inputs("t5")
        model(**inputs, adapter_names=["a", "b", BASE]).logits.pow(2).mean().backward()
        results.append({k: t.grad.clone() for n in ("a", "b") for k, t in model.adapter_state_dict(n).items()})
    for k in results[0]:
        assert results[0][k].abs().sum() > 0
        torch.testing.assert_close(results[1][k], results[0][k], atol=1e-5, rtol=1e-5)


def test_t5_generate_mixed_rows_equal_separate():
    model = t5_pair().eval()
    inputs = make_inputs("t5")
    kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
              do_sample=False, output_scores=True, return_dict_in_generate=True)
    rows = ["b", BASE, "a"]
    mixed = model.generate(adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        if name == BASE:
            with model.disable_adapter():
                single = model.generate(**kw)
        else:
            model.set_adapter(name)
            single = model.generate(**kw)
        assert torch.equal(mixed.sequences[i], single.sequences[i])
        torch.testing.assert_close(torch.stack(mixed.scores)[:, i], torch.stack(single.scores)[:, i],
                                   atol=1e-5, rtol=1e-5)


def test_t5_unequal_stacks_refused_with_reason():
    with pytest.raises(ConfigError, match="2 encoder and 3 decoder .*num_layers=2 slots"):
        get_peft_model(t5(2, 3), PrefixTuningConfig())


def test_unload_restores_attention_implementation():
    base = tiny("llama", "causal-lm")
    impl = base.config._attn_implementation
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=2))
    assert base.config._attn_implementation == f"peftlab_{impl}"
    plain = model.unload()
    assert plain.config._attn_implementation == impl and not plain._forward_pre_hooks
    assert not any(hasattr(m, "_peftlab_site") for m in plain.modules())
