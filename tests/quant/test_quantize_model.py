"""quantize_model, memory_report and load(..., quantize=...)."""

import pytest
import torch
import torch.nn as nn

from peftlab import LoraConfig, get_peft_model
from peftlab.models import TASKS, load, tiny
from peftlab.quant import QuantLinear, memory_report, quantize_model
from tests.helpers import chat_tokenizer

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_replaces_the_linear_layers_but_not_the_head_or_embeddings():
    model = quantize_model(tiny("llama", "causal-lm", seed=0), "nf4")
    quantized = {p for p, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {f"model.layers.{i}.{kind}.{p}" for i in range(2) for p in PROJ
                         for kind in ("self_attn" if p.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp",)}
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding

    model = quantize_model(tiny("llama", "causal-lm", seed=0), "int8", skip=("lm_head", "down_proj"))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 12
    assert all(m.scheme == "int8" for m in model.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize("scheme, max_logit_error", [("int8", 0.02), ("nf4", 0.3)])
def test_quantized_model_stays_close_to_the_original(scheme, max_logit_error):
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = tiny("llama", "causal-lm", seed=0)(input_ids=ids).logits
        quant = quantize_model(tiny("llama", "causal-lm", seed=0), scheme)(input_ids=ids).logits
    error = (quant - dense).abs().max().item()
    assert 0 < error < max_logit_error


def test_memory_of_a_realistic_stack_nf4_under_a_fifth_of_fp32():
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Linear(*shape, bias=False) for shape in [(576, 1536), (1536, 576)] * 2])
    n = 576 * 1536
    int8 = memory_report(quantize_model(nn.Sequential(*[nn.Linear(576, 1536, bias=False)]), "int8"))
    assert int8["ratio"] == pytest.approx((n + 4 * 1536) / (4 * n))  # 8 bits + one fp32 scale per row
    report = memory_report(quantize_model(stack, "nf4"))
    assert report["quantized_layers"] == 4 and report["fp32_bytes"] == 4 * 4 * n
    # NF4 with double quantisation: 4 + 8/64 + 32/(64·256) bits, plus a mean and 16 levels per layer
    assert report["bits_per_param"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert report["ratio"] == pytest.approx(0.129, abs=1e-3) and report["ratio"] <= 0.2
    assert report["model_bytes"] == report["quantized_bytes"]  # nothing else in the stack


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="quantize the base model first, then call get_peft_model"):
        quantize_model(get_peft_model(tiny("llama", "causal-lm"), LoraConfig(target_modules=["q_proj"])))
    with pytest.raises(ValueError, match=r"backend='bitsandbytes' needs scheme='nf4' \(got 'int8'\)"):
        quantize_model(tiny("llama", "causal-lm"), "int8", backend="bitsandbytes")
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize_model(tiny("llama", "causal-lm"), backend="cuda")
    with pytest.raises(ValueError, match="unknown quantisation scheme 'nf8'"):
        quantize_model(tiny("llama", "causal-lm"), "nf8")


def test_load_quantizes_a_model_directory(tmp_path):
    tiny("llama", "causal-lm", seed=0).save_pretrained(tmp_path)
    chat_tokenizer(["a", "b"]).save_pretrained(tmp_path)
    model, _ = load(str(tmp_path), quantize="nf4")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    with pytest.raises(ValueError, match=r"quantize='fp4' is not a scheme; use one of \('nf4', 'int8'\)"):
        load(str(tmp_path), quantize="fp4")


@pytest.mark.parametrize("streamed", [True, False])
def test_quantized_load_releases_the_checkpoint_memory_map(tmp_path, monkeypatch, streamed):
    """from_pretrained's tensors view the safetensors file's memory map (a storage that cannot be
    resized); after quantising, nothing may keep that map — it would hold every page quantisation
    read (on SmolLM2, 500 MB of the 538 MB file) for the embeddings and norms that remain."""
    tiny("llama", "causal-lm", seed=0).save_pretrained(tmp_path)
    chat_tokenizer(["a", "b"]).save_pretrained(tmp_path)

    def mapped(model):
        tensors = list(model.parameters()) + list(model.buffers())
        return [t.shape for t in tensors if not t.untyped_storage().resizable()]

    plain, _ = load(str(tmp_path))
    assert mapped(plain), "precondition: an unquantised load views the file's memory map"
    if not streamed:
        _whole_then_quantize(monkeypatch)
    model, _ = load(str(tmp_path), quantize="nf4")
    assert mapped(model) == []
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    torch.testing.assert_close(model.model.embed_tokens.weight, plain.model.embed_tokens.weight, atol=0, rtol=0)


def _save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    chat_tokenizer(["a", "b"]).save_pretrained(path)
    return str(path)


def _whole_then_quantize(monkeypatch):
    """Make load() take its other road: from_pretrained, then quantize_model."""
    import peftlab.models.loaders as loaders
    monkeypatch.setattr(loaders, "stream_quantized", lambda *args, **kwargs: None)


@pytest.mark.parametrize("arch, task, tied, scheme, shard", [
    ("llama", "causal-lm", False, "nf4", None),
    ("llama", "causal-lm", True, "int8", "30KB"),   # tied head; several shards with an index
    ("bert", "base", False, "nf4", "30KB"),         # linear biases (each must reach its quantised layer)
    ("t5", "seq2seq", False, "nf4", None),
])
def test_streamed_quantized_load_equals_load_then_quantize(tmp_path, monkeypatch, arch, task, tied, scheme, shard):
    """load(dir, quantize=) reads the safetensors files tensor by tensor into the quantised model
    (nothing dense beyond one tensor); it must build exactly what from_pretrained + quantize_model
    builds: the same modules, the same tensors bit for bit, eval mode, tied weights, generation config."""
    import peftlab.models.loaders as loaders

    base = tiny(arch, task, seed=0)
    if tied:
        base.config.tie_word_embeddings = True
        base.tie_weights()
    source = _save(base, tmp_path / "m", **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    streamed_calls = []
    real = loaders.stream_quantized
    monkeypatch.setattr(loaders, "stream_quantized", lambda *a, **k: streamed_calls.append(1) or real(*a, **k))
    streamed, _ = load(source, task=task, quantize=scheme)
    assert streamed_calls and streamed is not None
    _whole_then_quantize(monkeypatch)
    whole, _ = load(source, task=task, quantize=scheme)

    assert [(n, type(m).__name__) for n, m in streamed.named_modules()] == \
        [(n, type(m).__name__) for n, m in whole.named_modules()]
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert dict(streamed.named_buffers()).keys() == dict(whole.named_buffers()).keys()
    for (name, x), (_, y) in zip(streamed.named_buffers(), whole.named_buffers()):
        assert torch.equal(x, y), name
    assert not streamed.training
    if whole.can_generate():
        assert streamed.generation_config.to_dict() == whole.generation_config.to_dict()
    if tied:
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        extra = {"decoder_input_ids": ids} if task == "seq2seq" else {}
        out_a, out_b = streamed(input_ids=ids, **extra), whole(input_ids=ids, **extra)
    key = "logits" if task != "base" else "last_hidden_state"
    assert torch.equal(out_a[key], out_b[key])


def test_streaming_steps_aside_for_what_it_cannot_read_exactly(tmp_path):
    """A new classification head (not in the checkpoint) or from_pretrained options: stream_quantized
    says None and load() takes the ordinary road."""
    from peftlab.models.quantized import stream_quantized

    source = _save(tiny("llama", "causal-lm", seed=0), tmp_path / "m")
    assert stream_quantized(source, TASKS["seq-cls"], torch.float32, "nf4", {}) is None  # classifier missing
    assert stream_quantized(source, TASKS["causal-lm"], torch.float32, "nf4", {"revision": "main"}) is None
    assert stream_quantized(str(tmp_path / "nowhere"), TASKS["causal-lm"], torch.float32, "nf4", {}) is None
    model, _ = load(source, task="seq-cls", num_labels=3, quantize="nf4")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
