"""LLaMA-Adapter against a closed form, Hugging Face PEFT (the oracle) and its own promises."""

import peft
import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from peftlab import ConfigError, LlamaAdapterConfig, PeftModel, get_peft_model
from peftlab.models import tiny
from tests.conftest import make_inputs, output_of

HEADS, HEAD_DIM = 4, 8  # tiny llama/gpt2: 4 query heads of 8 (llama: 2 kv heads)


def logits(model, arch="llama"):
    inputs = make_inputs(arch)
    with torch.no_grad():
        return output_of(model(**inputs), inputs)


def set_gates(named_tensors, value=None, seed=0):
    """Give every gate a non-zero value (as a trained adapter has), or random ones (per head)."""
    g = torch.Generator().manual_seed(seed)
    gates = [t for key, t in named_tensors if key.endswith("adaption_gate")]
    with torch.no_grad():
        for t in gates:
            t.copy_(torch.full_like(t, value) if value is not None else torch.randn(t.shape, generator=g))
    return len(gates)


# -- the formula, by hand, on the top layer ---------------------------------------------------------
def _queries(arch, attn, hidden, kwargs):
    B, T, _ = hidden.shape
    if arch == "gpt2":
        q = attn.c_attn(hidden).split(HEADS * HEAD_DIM, dim=-1)[0]
        return q.view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
    q = attn.q_proj(hidden).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]  # RoPE on the text queries; the prompt keys get none
    return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)


def _prompt_kv(arch, attn, prompt):
    if arch == "gpt2":
        _, k, v = attn.c_attn(prompt).split(HEADS * HEAD_DIM, dim=-1)
    else:
        k, v = attn.k_proj(prompt), attn.v_proj(prompt)
    kv_heads = k.shape[-1] // HEAD_DIM
    k = k.view(1, -1, kv_heads, HEAD_DIM).transpose(1, 2)  # (1, kv_heads, K, head_dim)
    v = v.view(1, -1, kv_heads, HEAD_DIM).transpose(1, 2)
    return repeat_kv(k, HEADS // kv_heads), repeat_kv(v, HEADS // kv_heads)


@pytest.mark.parametrize("arch,attn_path,out_proj", [
    ("llama", "model.layers.1.self_attn", "o_proj"),
    ("gpt2", "transformer.h.1.attn", "c_proj"),
])
@pytest.mark.parametrize("gate", ["scalar", "tanh_per_head"])
def test_top_layer_adds_gated_prompt_attention(arch, attn_path, out_proj, gate):
    """Output projection input with the adapter − without = g · softmax(q kᵀ/√d) v, by hand."""
    model = get_peft_model(tiny(arch, "causal-lm").eval(), LlamaAdapterConfig(adapter_len=5, adapter_layers=1, gate=gate))
    set_gates(model.adapter_state_dict().items())
    attn = model.base_model.get_submodule(attn_path)
    if arch == "llama":
        assert attn.k_proj.out_features == 2 * HEAD_DIM, "GQA: 2 kv heads serve the 4 query heads"
    seen = []
    h1 = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(("in", a[0] if a else kw["hidden_states"], kw)),
                                        with_kwargs=True)
    h2 = getattr(attn, out_proj).register_forward_hook(lambda m, a, out: seen.append(("ctx", a[0])))
    with model.disable_adapter():
        logits(model, arch)
    logits(model, arch)
    h1.remove(), h2.remove()
    (_, hidden, kw), (_, base_ctx), (_, hidden2, _), (_, ctx) = seen
    assert torch.equal(hidden, hidden2), "only the top layer is adapted, so its input is the base model's"

    state = model.adapter_state_dict()
    prompt, g = state[f"{attn_path}.adaption_prompt"], state[f"{attn_path}.adaption_gate"]
    with torch.no_grad():
        q = _queries(arch, attn, hidden, kw)  # (B, heads, T, head_dim)
        k, v = _prompt_kv(arch, attn, prompt)  # (1, heads, K, head_dim)
        probs = torch.softmax(q @ k.transpose(2, 3) / HEAD_DIM ** 0.5, dim=-1)
        gate_value = g.tanh() if gate == "tanh_per_head" else g
        expected = (gate_value * probs) @ v  # (B, heads, T, head_dim)
    B, T = hidden.shape[:2]
    torch.testing.assert_close(ctx - base_ctx, expected.transpose(1, 2).reshape(B, T, -1), atol=1e-6, rtol=1e-5)
    assert g.shape == ((1, HEADS, 1, 1) if gate == "tanh_per_head" else (1,))
    assert prompt.shape == (1, 5, HEADS * HEAD_DIM)


# -- Hugging Face PEFT parity (llama: 4 heads sharing 2 kv heads, so GQA is exercised) ---------------
@pytest.mark.parametrize("layers", [1, 2])
def test_peft_adaption_prompt_loads_in_peftlab(layers, tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny("llama").eval(), peft.AdaptionPromptConfig(
        adapter_len=4, adapter_layers=layers, task_type="CAUSAL_LM"))
    assert set_gates(theirs.named_parameters(), 0.7) == layers
    expected = logits(theirs)
    assert (expected - logits(tiny("llama").eval())).abs().max() > 1e-3, "the adapter acts, so parity means something"
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny("llama").eval(), tmp_path)
    assert ours.peft_config["default"] == LlamaAdapterConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=layers,
                                                             target_modules="self_attn")
    assert (logits(ours) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("layers", [1, 2])
def test_peftlab_adapter_loads_in_peft(layers, tmp_path):
    ours = get_peft_model(tiny("llama").eval(), LlamaAdapterConfig(adapter_len=4, adapter_layers=layers,
                                                                   task_type="CAUSAL_LM"))
    set_gates(ours.adapter_state_dict().items(), 0.7)
    expected = logits(ours)
    assert (expected - logits(tiny("llama").eval())).abs().max() > 1e-3, "the adapter acts, so parity means something"
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny("llama").eval(), tmp_path)
    assert {n for n, _ in theirs.named_parameters() if "adaption_" in n} == \
        {"base_model.model." + k for k in ours.adapter_state_dict()}, "same tensor keys as PEFT's own"
    assert (logits(theirs) - expected).abs().max() <= 1e-5


def test_per_head_tanh_gates_refuse_peft_format(tmp_path):
    """GPT-2 in PEFT's format: tests/formats/test_hf_peft_adaption_gpt2.py."""
    model = get_peft_model(tiny("llama"), LlamaAdapterConfig(gate="tanh_per_head"))
    with pytest.raises(ConfigError, match="gate='tanh_per_head' has no Hugging Face PEFT form"):
        model.save_pretrained(tmp_path, format="peft")


def test_per_head_tanh_gates_roundtrip_in_peftlab_format(tmp_path):
    model = get_peft_model(tiny("llama").eval(), LlamaAdapterConfig(adapter_len=3, gate="tanh_per_head"))
    set_gates(model.adapter_state_dict().items())
    expected = logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(tiny("llama").eval(), tmp_path)), expected)


# -- training and generation ----------------------------------------------------------------------
def test_zero_init_trains_gates_first_and_nothing_else():
    """At g = 0 the prompt gets no gradient (its path is gated off); the gate does; the base none."""
    model = get_peft_model(tiny("llama").train(), LlamaAdapterConfig(adapter_len=3))
    inputs = make_inputs("llama")
    output_of(model(**inputs), inputs).pow(2).mean().backward()
    for key, t in model.adapter_state_dict().items():
        if key.endswith("adaption_gate"):
            assert t.grad.abs().sum() > 0, key
        else:
            assert torch.equal(t.grad, torch.zeros_like(t)), key
    assert all(p.grad is None for p in model.base_model.parameters() if not p.requires_grad)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(t) for t in model.adapter_state_dict().values()}


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny("llama").train(), LlamaAdapterConfig(adapter_len=3, gate_init=0.5))
        if checkpointing:
            model.gradient_checkpointing_enable()
        inputs = make_inputs("llama")
        output_of(model(**inputs), inputs).pow(2).mean().backward()
        grads.append({k: t.grad.clone() for k, t in model.adapter_state_dict().items()})
    for k in grads[0]:
        assert grads[0][k].abs().sum() > 0, k
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_cache_equals_without(arch):
    torch.manual_seed(0)
    model = get_peft_model(tiny(arch).eval(), LlamaAdapterConfig(adapter_len=3, gate_init=1.0))
    ids = make_inputs(arch)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
              output_scores=True, return_dict_in_generate=True)
    cached = model.generate(input_ids=ids, use_cache=True, **kw)
    uncached = model.generate(input_ids=ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        plain = model.generate(input_ids=ids, **kw)
    assert (torch.stack(cached.scores) - torch.stack(plain.scores)).abs().max() > 1e-3, "the adapter acts at every step"


def test_t5_adapts_the_top_decoder_layers_only():
    base = tiny("t5", "seq2seq").eval()
    model = get_peft_model(base, LlamaAdapterConfig(adapter_len=2, adapter_layers=1, gate_init=1.0))
    assert [k.rsplit(".", 1)[0] for k in model.adapter_state_dict()] == ["decoder.block.1.layer.0.SelfAttention"] * 2
    inputs = make_inputs("t5")
    with torch.no_grad():
        adapted = model(**inputs).encoder_last_hidden_state
        with model.disable_adapter():
            plain = model(**inputs).encoder_last_hidden_state
    assert torch.equal(adapted, plain), "the encoder is untouched"


# -- clear errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,match", [
    (dict(adapter_len=0), "adapter_len must be a positive int, got 0"),
    (dict(adapter_layers=-1), "adapter_layers must be a positive int or None"),
    (dict(gate="tanh"), r"gate must be one of \('scalar', 'tanh_per_head'\), got 'tanh'"),
    (dict(gate_init=float("nan")), "gate_init must be a finite number"),
    (dict(target_modules=["self_attn"]), "target_modules must be one module name"),
])
def test_invalid_config_fields(fields, match):
    with pytest.raises(ConfigError, match=match):
        LlamaAdapterConfig(**fields)


def test_errors_name_the_model_and_the_fix():
    with pytest.raises(ConfigError, match="adapter_layers=3 but LlamaForCausalLM's decoder has 2 attention layers"):
        get_peft_model(tiny("llama"), LlamaAdapterConfig(adapter_layers=3))
    with pytest.raises(ConfigError, match="target_modules='attn' matched no self-attention.*'self_attn'"):
        get_peft_model(tiny("llama"), LlamaAdapterConfig(target_modules="attn"))
    base = tiny("llama")
    attn = base.model.layers[1].self_attn
    attn.wk = attn.k_proj  # an architecture whose projections have names we do not know
    del attn.k_proj
    with pytest.raises(ConfigError, match=r"model.layers.1.self_attn: .*LlamaAttention.*'wk'.*_SEPARATE_KV"):
        get_peft_model(base, LlamaAdapterConfig(adapter_layers=1))
