"""PeftModel.lean_loss(): the same loss and adapter gradients as the model's own loss, without logits."""

import logging

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from peftlab import BASE, LoraConfig, PromptTuningConfig, get_peft_model
from peftlab.models import tiny
from peftlab.quant import QuantLinear, quantize_model

V = 97  # a prime vocabulary, so no other dimension is mistaken for it


def _randomize(model, seed=0):
    """Non-zero adapter weights everywhere (LoRA's B starts at zero), so every gradient is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _inputs(batch=3, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt that is not scored
    labels[2, 3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _run(model, lean, inputs, chunk_size=4, **kwargs):
    """(output, gradients of the trainable tensors) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    with model.lean_loss(lean, chunk_size=chunk_size):
        out = model(**inputs, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_same(model, inputs, chunk_size=4, **kwargs):
    standard, want = _run(model, False, inputs, chunk_size, **kwargs)
    lean, got = _run(model, True, inputs, chunk_size, **kwargs)
    assert lean.logits is None and standard.logits is not None
    assert type(lean) is type(standard)
    torch.testing.assert_close(lean.loss, standard.loss, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    return standard, lean, got


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("num_items", [None, torch.tensor(31)])
def test_lora_with_adapted_head_matches_standard(arch, num_items):
    # LoRA on the head too: the lean path calls the wrapped head, chunk by chunk.
    target = r".*(q_proj|v_proj|lm_head)" if arch == "llama" else r".*(c_attn|lm_head)"
    model = _randomize(get_peft_model(tiny(arch, vocab_size=V), LoraConfig(r=4, target_modules=target)))
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    _, _, grads = _assert_same(model, _inputs(), chunk_size=5, **kwargs)  # 17 labelled rows
    assert any("lm_head" in n for n in grads)


def test_quantized_head_matches_standard():
    base = quantize_model(tiny("llama", vocab_size=V), "int8", skip=())  # the head too
    assert isinstance(base.get_output_embeddings(), QuantLinear)
    _assert_same(_randomize(get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))), _inputs())


def test_no_labelled_position_matches_standard():
    model = _randomize(get_peft_model(tiny("llama", vocab_size=V), LoraConfig(r=4, target_modules="all-linear")))
    inputs = _inputs()
    inputs["labels"][:, 1:] = -100
    standard, lean, grads = _assert_same(model, inputs)
    assert standard.loss.isnan() and lean.loss.isnan()  # transformers' mean over no token
    assert all(not g.any() for g in grads.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mixed_route_with_trained_head_copies(checkpointing):
    # modules_to_save: each adapter trains its own copy of the head; rows route to theirs.
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(tiny("llama", vocab_size=V), config, adapter_name="a")
    model.add_adapter("b", config)
    _randomize(model)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    _, _, grads = _assert_same(model, _inputs(), adapter_names=["a", BASE, "b"])
    heads = [n for n in grads if "lm_head" in n]
    assert len(heads) == 2 and all(grads[n].any() for n in heads)


def test_prompt_tuning_padded_labels():
    # Virtual tokens in front: prepend_prompts pads the labels with -100, the lean path scores the rest.
    model = get_peft_model(tiny("llama", vocab_size=V), PromptTuningConfig(num_virtual_tokens=3), adapter_name="a")
    model.add_adapter("b", PromptTuningConfig(num_virtual_tokens=5))
    _randomize(model)
    _assert_same(model, _inputs())
    _assert_same(model, _inputs(), adapter_names=["b", BASE, "a"])


def test_calls_it_does_not_fit_run_as_usual():
    cases = [
        (tiny("llama", vocab_size=V), {**_inputs(), "labels": None}),  # no labels
        (tiny("llama", "seq-cls", vocab_size=V), {**_inputs(), "labels": torch.tensor([0, 1, 1])}),
        (tiny("t5", "seq2seq", vocab_size=V), {**_inputs(), "labels": torch.randint(3, V, (3, 4))}),
    ]
    for base, inputs in cases:
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).eval()
        with torch.no_grad():
            want = model(**inputs)
            with model.lean_loss():
                got = model(**inputs)
        assert got.logits is not None and torch.equal(got.logits, want.logits)


def test_softcapped_logits_fall_back_with_one_warning(caplog):
    config = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0,
                          pad_token_id=0)
    torch.manual_seed(0)
    base = Gemma2ForCausalLM._from_config(config, attn_implementation="eager")
    model = _randomize(get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")))
    with caplog.at_level(logging.WARNING, logger="peftlab.lean"):
        for _ in range(2):
            standard, _ = _run(model, False, _inputs())
            lean, _ = _run(model, True, _inputs())
            assert lean.logits is not None  # the model's own forward served the call
            torch.testing.assert_close(lean.loss, standard.loss)
    warnings = [r.getMessage() for r in caplog.records if r.name == "peftlab.lean"]
    assert len(warnings) == 1 and "changes the logits after the output head" in warnings[0]


def test_nothing_of_vocabulary_width_is_saved_for_backward():
    model = _randomize(get_peft_model(tiny("llama", vocab_size=V), LoraConfig(r=4, target_modules="all-linear")))
    params = {p.data_ptr() for p in model.parameters()}

    def vocab_wide_saved(lean):
        found = []

        def pack(t):
            if V in t.shape and t.data_ptr() not in params:  # the head's weight is kept by any path
                found.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), model.lean_loss(lean):
            model(**_inputs())
        return found

    assert vocab_wide_saved(False)  # the check can fail: the standard path keeps (B, T, V) logits
    assert vocab_wide_saved(True) == []


def test_lean_loss_switch():
    model = get_peft_model(tiny("llama", vocab_size=V), LoraConfig(r=4, target_modules="all-linear"))
    assert not model.lean_loss_enabled
    with model.lean_loss():
        assert model.lean_loss_enabled
        with model.lean_loss(enabled=False):
            assert not model.lean_loss_enabled
            assert model(**_inputs()).logits is not None
        assert model.lean_loss_enabled
    assert not model.lean_loss_enabled
    with pytest.raises(ValueError, match="chunk_size=0"):
        with model.lean_loss(chunk_size=0):
            pass
