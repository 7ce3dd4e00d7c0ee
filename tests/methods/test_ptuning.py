"""P-tuning: the encoders against hand-written forwards, the file layouts, and a learning run.

Parity with Hugging Face PEFT is in tests/formats/test_hf_peft_ptuning_multitask.py; the shared
invariants (mixed batches, save/load, gradients) in tests/methods/test_invariants.py.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from peftlab import AdapterLoadError, ConfigError, PeftModel, PTuningConfig, get_peft_model
from peftlab.data import collate
from peftlab.formats import read_adapter, write_adapter
from peftlab.models import tiny
from peftlab.train import TrainArgs, train


def encoder_of(model, name="default"):
    return model.model_adapters[name]


def mlp_by_hand(mlp, x):
    """Linear layers with ReLU between them, from the weights."""
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(linears):
        x = x @ lin.weight.T + lin.bias
        x = F.relu(x) if i < len(linears) - 1 else x
    return x


def lstm_by_hand(lstm, x):
    """Bidirectional stacked LSTM over x (T, d_in) -> (T, 2h), gate by gate (PyTorch's i, f, g, o order)."""
    T = x.shape[0]
    for layer in range(lstm.num_layers):
        directions = []
        for suffix, steps in (("", range(T)), ("_reverse", range(T - 1, -1, -1))):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}{suffix}"), getattr(lstm, f"weight_hh_l{layer}{suffix}")
            b = getattr(lstm, f"bias_ih_l{layer}{suffix}") + getattr(lstm, f"bias_hh_l{layer}{suffix}")
            h = c = torch.zeros(lstm.hidden_size)
            out = [None] * T
            for t in steps:
                i, f, g, o = (w_ih @ x[t] + w_hh @ h + b).chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                out[t] = h
            directions.append(torch.stack(out))
        x = torch.cat(directions, dim=-1)
    return x


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_mlp_encoder_by_hand(layers):
    config = PTuningConfig(num_virtual_tokens=5, encoder_hidden_size=12, encoder_num_layers=layers)
    model = get_peft_model(tiny("llama"), config)
    enc = encoder_of(model)
    linears = [m for m in enc.mlp_head if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers + 1 and linears[0].out_features == 12 and linears[-1].out_features == 32
    with torch.no_grad():
        expected = mlp_by_hand(enc.mlp_head, enc.embedding.weight)  # (n, d)
        torch.testing.assert_close(enc.prompt(3), expected.expand(3, -1, -1))


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_encoder_by_hand(layers):
    model = get_peft_model(tiny("llama"), PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=6,
                                                        encoder_num_layers=layers, encoder_dropout=0.3))
    enc = encoder_of(model).eval()  # dropout acts between LSTM layers in training only
    with torch.no_grad():
        hidden = lstm_by_hand(enc.lstm_head, enc.embedding.weight)  # (n, 2h)
        assert hidden.shape == (4, 12)
        torch.testing.assert_close(enc.prompt(2), mlp_by_hand(enc.mlp_head, hidden).expand(2, -1, -1))


def test_virtual_tokens_are_spliced_in_front():
    base = tiny("llama").eval()
    model = get_peft_model(base, PTuningConfig(num_virtual_tokens=3, encoder="lstm"))
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        prompt = encoder_of(model).prompt(2)
        expected = base(inputs_embeds=torch.cat([prompt, base.get_input_embeddings()(ids)], dim=1)).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_seq2seq_encoder_runs_over_both_blocks_and_prompts_the_encoder_only():
    """As in Hugging Face PEFT: 2n inputs for T5, all through the (bidirectional) encoder, first n used."""
    base = tiny("t5", "seq2seq").eval()
    model = get_peft_model(base, PTuningConfig(num_virtual_tokens=3, encoder="lstm", task_type="SEQ_2_SEQ_LM"))
    enc = encoder_of(model)
    assert enc.embedding.weight.shape == (6, 32)
    ids, dec = torch.randint(3, 100, (2, 5)), torch.randint(3, 100, (2, 4))
    with torch.no_grad():
        full = mlp_by_hand(enc.mlp_head, lstm_by_hand(enc.lstm_head, enc.embedding.weight))  # (2n, d)
        torch.testing.assert_close(enc.prompt(2), full[:3].expand(2, -1, -1))
        embeds = torch.cat([full[:3].expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        out = model(input_ids=ids, decoder_input_ids=dec).logits
        assert out.shape[1] == 4, "no decoder-side virtual tokens"
        torch.testing.assert_close(out, base(inputs_embeds=embeds, decoder_input_ids=dec).logits)


def test_file_holds_encoder_and_its_output(tmp_path):
    model = get_peft_model(tiny("llama"), PTuningConfig(num_virtual_tokens=3, encoder="lstm", encoder_num_layers=2,
                                                        encoder_dropout=0.5))
    model.train()  # the saved output must still be dropout-free
    model.save_pretrained(tmp_path)
    _, tensors = read_adapter(tmp_path)
    enc = encoder_of(model).eval()
    encoder_keys = {k for k in tensors if k.startswith("prompt_encoder.")}
    assert encoder_keys == {f"prompt_encoder.{k}" for k, _ in enc.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(tensors["prompt_embeddings"], enc.output())
    # Loaded to keep training: the encoder is back, trainable, with the same output.
    loaded = PeftModel.from_pretrained(tiny("llama"), tmp_path, is_trainable=True)
    trainable = {k for k, t in loaded.adapter_state_dict().items() if t.requires_grad}
    assert trainable == {k for k in tensors if k.startswith("prompt_encoder.")}
    with torch.no_grad():
        torch.testing.assert_close(encoder_of(loaded).eval().output(), tensors["prompt_embeddings"])


def test_output_only_file_loads_for_inference_and_refuses_training(tmp_path):
    """Hugging Face PEFT's layout: prompt_embeddings alone. Serve it; don't pretend to resume the encoder."""
    model = get_peft_model(tiny("llama"), PTuningConfig(num_virtual_tokens=3))
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "full")
    config, tensors = read_adapter(tmp_path / "full")
    write_adapter(tmp_path / "output_only", config, {"prompt_embeddings": tensors["prompt_embeddings"]})

    loaded = PeftModel.from_pretrained(tiny("llama"), tmp_path / "output_only")
    assert set(loaded.adapter_state_dict()) == {"prompt_embeddings"}
    assert loaded.trainable_parameters()[0] == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    loaded.save_pretrained(tmp_path / "again")  # still the output alone
    assert set(read_adapter(tmp_path / "again")[1]) == {"prompt_embeddings"}

    with pytest.raises(AdapterLoadError, match="holds only the prompt encoder's output.*is_trainable=False"):
        PeftModel.from_pretrained(tiny("llama"), tmp_path / "output_only", is_trainable=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="encoder must be one of"):
        PTuningConfig(encoder="gru")
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive int"):
        PTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="encoder_num_layers must be a positive int"):
        PTuningConfig(encoder_num_layers=0)
    with pytest.raises(ConfigError, match="encoder_dropout must be in"):
        PTuningConfig(encoder_dropout=1.0)
    model = get_peft_model(tiny("llama"), PTuningConfig(num_virtual_tokens=2, encoder_num_layers=3))
    with pytest.raises(ConfigError, match="exactly 2 hidden layers.*format='peftlab'"):
        model.save_pretrained("/nonexistent", format="peft")


def constant_target_rows(n=240, seed=0):
    # Whatever the text, predict token 7: only the virtual tokens can steer the frozen model there.
    ids = torch.randint(3, 50, (n, 10), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{"input_ids": row, "labels": [7] * 10} for row in ids]


def sharp_llama():
    # A random head at init scale 0.02 gives near-uniform logits whatever the hidden state; scaled up,
    # the frozen model can express a confident prediction when steered.
    model = tiny("llama", "causal-lm", seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_learns_a_synthetic_task(encoder):
    torch.manual_seed(0)
    # 8 virtual tokens: with 4 the loss levels off near the bar (x 0.6 in 30 steps).
    model = get_peft_model(sharp_llama(), PTuningConfig(num_virtual_tokens=8, encoder=encoder))
    args = TrainArgs(steps=30, batch_size=8, lr=3e-2, progress=False)
    losses = train(model, constant_target_rows(), args=args, collate_fn=partial(collate, pad_id=0)).losses
    last = sum(losses[-5:]) / 5
    assert last < 0.6 * losses[0], f"loss did not fall clearly: {losses[0]:.3f} -> {last:.3f}"
