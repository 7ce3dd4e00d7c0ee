"""P-tuning and multitask prompt tuning against Hugging Face PEFT: same weights, same logits (fp32, ≤ 1e-5).

Inputs are unpadded, for the reason given in test_hf_peft_prompt.py. What can be compared, and how:

* P-tuning, live encoder: PEFT's ``PromptEncoder`` weights copied into ours by name (same module
  structure: ``embedding``, ``mlp_head``, ``lstm_head``), both encoders running — MLP and LSTM.
* P-tuning, peftlab file → PEFT: our file holds the encoder and its output; PEFT reads the output
  (``prompt_embeddings``) and ignores the encoder keys.
* P-tuning, PEFT file → peftlab: PEFT saves only the output, so the encoder cannot come back; we
  load the output as a fixed table (inference only; ``is_trainable=True`` is refused, as PEFT
  refuses it for every prompt-learning adapter it loads).
* Multitask, both directions: the file layout is identical (``prompt_embeddings``,
  ``prefix_task_cols``, ``prefix_task_rows``), with mixed task ids in one batch.
  On T5, PEFT's seq2seq path for this method builds the decoder-side prompts only when it derives
  the decoder input from ``labels`` (given ``decoder_input_ids`` it fails), so T5 is compared with
  ``labels`` alone; logits then include the n decoder prompt positions, in both libraries.
"""

import peft
import pytest
import torch

from peftlab import MultitaskPromptConfig, PeftModel, PTuningConfig, get_peft_model
from peftlab.formats import read_adapter
from tests.conftest import make_inputs

ARCHS = ["llama", "gpt2", "bert", "t5"]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
ENCODER = {"mlp": "MLP", "lstm": "LSTM"}
TASK_IDS = torch.tensor([1, 0, 1])


def inputs(arch, task_ids=None):
    out = make_inputs(arch)
    out["attention_mask"] = torch.ones_like(out["attention_mask"])
    if task_ids is not None:
        out["task_ids"] = task_ids
        if arch == "t5":
            out["labels"] = out.pop("decoder_input_ids")
    return out


def logits(model, arch, task_ids=None):
    model.eval()
    with torch.no_grad():
        return model(**inputs(arch, task_ids)).logits


def assert_same(ours, theirs):
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-5


def ours_ptuning(model, arch, encoder):
    return get_peft_model(model, PTuningConfig(num_virtual_tokens=4, encoder=encoder, encoder_hidden_size=16,
                                               task_type=TASK[arch]))


def theirs_ptuning(model, arch, encoder):
    return peft.get_peft_model(model, peft.PromptEncoderConfig(num_virtual_tokens=4, task_type=TASK[arch],
                                                               encoder_reparameterization_type=ENCODER[encoder],
                                                               encoder_hidden_size=16))


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ptuning_encoder_matches_peft(arch, encoder, tiny_model):
    theirs = theirs_ptuning(tiny_model(arch), arch, encoder)
    ours = ours_ptuning(tiny_model(arch), arch, encoder)
    ours.model_adapters["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())  # same names
    assert_same(logits(ours, arch), logits(theirs, arch))


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peftlab_ptuning_loads_in_peft(arch, encoder, tiny_model, tmp_path):
    ours = ours_ptuning(tiny_model(arch), arch, encoder)
    expected = logits(ours, arch)
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert_same(logits(theirs, arch), expected)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_ptuning_loads_in_peftlab(arch, encoder, tiny_model, tmp_path):
    theirs = theirs_ptuning(tiny_model(arch), arch, encoder)
    expected = logits(theirs, arch)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert ours.peft_config["default"].encoder == encoder
    state = set(ours.adapter_state_dict())  # (plus the classifier head for SEQ_CLS)
    assert "prompt_embeddings" in state and not any(k.startswith("prompt_encoder.") for k in state), \
        "PEFT's file: the output table alone"
    assert_same(logits(ours, arch), expected)


def scramble(*tensors):
    """Unit-scale U and V (both libraries start them at 0.02), so task prompts differ clearly."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("arch", ARCHS)
def test_peftlab_multitask_loads_in_peft(arch, tiny_model, tmp_path):
    ours = get_peft_model(tiny_model(arch), MultitaskPromptConfig(num_virtual_tokens=3, num_tasks=2, num_ranks=2,
                                                                  task_type=TASK[arch]))
    adapter = ours.model_adapters["default"]
    scramble(adapter.prefix_task_cols, adapter.prefix_task_rows)
    expected = logits(ours, arch, TASK_IDS)
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert_same(logits(theirs, arch, TASK_IDS), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_multitask_loads_in_peftlab(arch, tiny_model, tmp_path):
    theirs = peft.get_peft_model(tiny_model(arch), peft.MultitaskPromptTuningConfig(
        num_virtual_tokens=3, num_tasks=2, num_ranks=2, task_type=TASK[arch]))
    encoder = theirs.prompt_encoder["default"]
    scramble(encoder.prefix_task_cols, encoder.prefix_task_rows)
    expected = logits(theirs, arch, TASK_IDS)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    config = ours.peft_config["default"]
    assert (config.num_virtual_tokens, config.num_tasks, config.num_ranks) == (3, 2, 2)
    assert_same(logits(ours, arch, TASK_IDS), expected)
    ours.save_pretrained(tmp_path / "ours", format="peft")
    file_ours, file_theirs = read_adapter(tmp_path / "ours")[1], read_adapter(tmp_path)[1]
    assert {k: v.shape for k, v in file_ours.items()} == {k: v.shape for k, v in file_theirs.items()}
