"""LLaMA-Adapter on GPT-2 against Hugging Face PEFT: the formulas differ, so the format is refused both ways.

PEFT 0.21's ``AdaptedAttentionGPT`` adds the gated prompt attention a = g · softmax(q kᵀ/√d) v to the
*output* of GPT-2's attention, after ``c_proj`` and unprojected; peftlab (like the paper and PEFT's
own Llama path) adds it before the output projection, so it arrives as a · W_proj. The first test pins
both formulas on the same tensors against the oracle, which is what justifies the refusals (if PEFT
changes its GPT-2 path, it fails and the refusals should be revisited); the others pin the refusals.
"""

import os

import peft
import pytest
import torch

from peftlab import AdapterLoadError, ConfigError, LlamaAdapterConfig, PeftModel, get_peft_model
from tests.conftest import make_inputs

HEADS, HEAD_DIM = 4, 8  # tiny gpt2: 4 heads of 8, hidden 32
ATTN = "transformer.h.1.attn"  # the top layer: adapter_layers=1


def unpadded_inputs():
    inputs = make_inputs("gpt2")
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    return inputs


def peft_gpt2(tiny_model, gate=0.7):
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_model("gpt2"), peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                                              task_type="CAUSAL_LM"))
    with torch.no_grad():
        model.get_parameter(f"base_model.model.{ATTN}.adaption_gate").fill_(gate)
    return model.eval()


def prompt_attention(attn, hidden, prompt, gate):
    """a = g · softmax(q kᵀ/√d) v by hand, flattened over heads: (B, T, heads · head_dim)."""
    B, T, _ = hidden.shape
    q = attn.c_attn(hidden).split(HEADS * HEAD_DIM, dim=-1)[0].view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
    _, k, v = attn.c_attn(prompt).split(HEADS * HEAD_DIM, dim=-1)
    k = k.view(1, -1, HEADS, HEAD_DIM).transpose(1, 2)  # (1, heads, K, head_dim)
    v = v.view(1, -1, HEADS, HEAD_DIM).transpose(1, 2)
    a = gate * torch.softmax(q @ k.transpose(2, 3) / HEAD_DIM ** 0.5, dim=-1) @ v  # (B, heads, T, head_dim)
    return a.transpose(1, 2).reshape(B, T, -1)


def test_peft_adds_prompt_attention_after_c_proj_and_peftlab_before(tiny_model):
    theirs = peft_gpt2(tiny_model)
    wrapper = theirs.get_submodule(f"base_model.model.{ATTN}")  # PEFT's AdaptedAttentionGPT
    seen = {}
    hooks = [wrapper.model.register_forward_pre_hook(lambda m, a, kw: seen.update(hidden=kw["hidden_states"]),
                                                     with_kwargs=True),
             wrapper.model.register_forward_hook(lambda m, a, out: seen.update(inner=out[0])),
             wrapper.register_forward_hook(lambda m, a, out: seen.update(outer=out[0]))]
    inputs = unpadded_inputs()
    with torch.no_grad():
        their_logits = theirs(**inputs).logits
    for h in hooks:
        h.remove()
    state = {k.removeprefix("base_model.model."): t.detach() for k, t in theirs.named_parameters()
             if "adaption_" in k}
    attn = wrapper.model
    with torch.no_grad():
        a = prompt_attention(attn, seen["hidden"], state[f"{ATTN}.adaption_prompt"], state[f"{ATTN}.adaption_gate"])
    assert a.abs().max() > 1e-2, "the prompt attention is not negligible, so the comparison means something"
    torch.testing.assert_close(seen["outer"] - seen["inner"], a, atol=1e-6, rtol=1e-5)  # PEFT: c_proj(·) + a

    ours = get_peft_model(tiny_model("gpt2"), LlamaAdapterConfig(adapter_len=3, adapter_layers=1)).eval()
    with torch.no_grad():
        for key, t in ours.adapter_state_dict().items():
            t.copy_(state[key])  # same keys and shapes: only the formula differs
    outputs = []
    hook = ours.base_model.get_submodule(ATTN).register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    with torch.no_grad():
        our_logits = ours(**inputs).logits
        with ours.disable_adapter():
            ours(**inputs)
    hook.remove()
    adapted, base = outputs
    # peftlab: c_proj(· + a) = c_proj(·) + a W_proj (GPT-2's Conv1D computes x @ weight + bias).
    torch.testing.assert_close(adapted - base, a @ attn.c_proj.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(base, seen["inner"], atol=1e-6, rtol=1e-5)
    assert (our_logits - their_logits).abs().max() > 1e-2, "the two formulas give different models"


def test_peft_gpt2_file_is_refused_with_reason(tiny_model, tmp_path):
    peft_gpt2(tiny_model).save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"GPT-2 \(target_modules='attn'\).*after c_proj, unprojected.*"
                                               r"no choice of prompt and gate converts.*use it with HF PEFT"):
        PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)


def test_peftlab_gpt2_adapter_refuses_peft_format_and_writes_nothing(tiny_model, tmp_path):
    ours = get_peft_model(tiny_model("gpt2"), LlamaAdapterConfig(adapter_len=3, adapter_layers=1, gate_init=0.7))
    out = tmp_path / "adapter"
    with pytest.raises(ConfigError, match=r"GPT-2 LLaMA-Adapter has no Hugging Face PEFT form.*after c_proj.*"
                                          r"save it with format='peftlab'"):
        ours.save_pretrained(out, format="peft")
    assert not out.exists() or not os.listdir(out), "a refused save leaves no partial adapter behind"
    ours.save_pretrained(out)  # peftlab's own format keeps it, exactly
    inputs = unpadded_inputs()
    with torch.no_grad():
        expected = ours(**inputs).logits
        loaded = PeftModel.from_pretrained(tiny_model("gpt2"), out).eval()
        assert torch.equal(loaded(**inputs).logits, expected)


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_model_types_peft_lacks_are_refused(arch, tiny_model, tmp_path):
    ours = get_peft_model(tiny_model(arch), LlamaAdapterConfig(adapter_len=2))
    with pytest.raises(ConfigError, match=rf"only for model types \('llama', 'mistral'\).*not '{arch}'"):
        ours.save_pretrained(tmp_path, format="peft")
