"""Prompt tuning against Hugging Face PEFT: same virtual tokens, same logits, both directions.

Inputs are unpadded here: for left-padded rows peftlab counts positions over real tokens (as
``generate`` does) while PEFT's forward counts pads too, so padded rows differ by design.
"""

import peft
import pytest
import torch

from peftlab import PeftModel, PromptTuningConfig, get_peft_model
from tests.conftest import make_inputs, output_of

ARCHS = ["llama", "gpt2", "bert", "t5"]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def unpadded(arch):
    inputs = make_inputs(arch)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    return inputs


def logits(model, arch):
    inputs = unpadded(arch)
    with torch.no_grad():
        return output_of(model(**inputs), inputs)


@pytest.mark.parametrize("arch", ARCHS)
def test_peftlab_prompt_loads_in_peft(arch, tiny_model, tmp_path):
    ours = get_peft_model(tiny_model(arch), PromptTuningConfig(num_virtual_tokens=4, task_type=TASK[arch]))
    expected = logits(ours, arch)
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert (logits(theirs, arch) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_prompt_loads_in_peftlab(arch, tiny_model, tmp_path):
    theirs = peft.get_peft_model(tiny_model(arch), peft.PromptTuningConfig(num_virtual_tokens=4, task_type=TASK[arch]))
    expected = logits(theirs, arch)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert ours.peft_config["default"].num_virtual_tokens == 4
    assert (logits(ours, arch) - expected).abs().max() <= 1e-5


def test_text_and_vocab_init(tiny_model):
    base = tiny_model("llama")
    table = base.get_input_embeddings().weight
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="text", init_token_ids=[7, 9]))
    prompt = model.adapter_state_dict()["prompt_embeddings"]
    torch.testing.assert_close(prompt, table[[7, 9, 7, 9, 7]])  # repeated, then truncated to 5
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="vocab"))
    prompt = model.adapter_state_dict()["prompt_embeddings"]
    assert all(any(torch.equal(row, t) for t in table) for row in prompt), "vocab init copies real token embeddings"


def test_prompt_tuning_refuses_merge_and_bad_config(tiny_model):
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="text")
