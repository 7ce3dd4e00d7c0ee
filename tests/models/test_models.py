"""Tests of peftlab.models: tiny() builders and load() with its offline aliases and cache.

Tests marked ``slow`` read the real packaged models (the SmolLM2 GGUF conversion takes ~30 s, once
per module); everything else runs in seconds.
"""

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers import models as tokenizer_models
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.trainer_utils import validate_quantization_for_training

from peftlab.models import ALIASES, TASKS, TINY_ARCHS, load, loaders, tiny

COMBOS = [(arch, task) for arch, tasks in TINY_ARCHS.items() for task in tasks]
VOCAB = 128
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"


def word_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code, with eos but (like many decoder tokenizers) no pad."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


def forward_inputs(arch: str, task: str, batch: int = 2, seq: int = 5) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    if arch == "t5":
        # T5's classifier pools the eos token (id 1), so each row must end with exactly one.
        ids[:, -1] = 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5" and task == "base":
        inputs["decoder_input_ids"] = ids[:, :3].contiguous()
    if task == "seq2seq":
        inputs["labels"] = ids[:, :4].contiguous()  # T5's loss flattens labels with .view()
    return inputs


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# --- tiny() -----------------------------------------------------------------------------------


EXPECTED_CLASS = {
    ("llama", "causal-lm"): "LlamaForCausalLM",
    ("llama", "seq-cls"): "LlamaForSequenceClassification",
    ("llama", "base"): "LlamaModel",
    ("gpt2", "causal-lm"): "GPT2LMHeadModel",
    ("gpt2", "seq-cls"): "GPT2ForSequenceClassification",
    ("gpt2", "base"): "GPT2Model",
    ("bert", "seq-cls"): "BertForSequenceClassification",
    ("bert", "base"): "BertModel",
    ("t5", "seq2seq"): "T5ForConditionalGeneration",
    ("t5", "seq-cls"): "T5ForSequenceClassification",
    ("t5", "base"): "T5Model",
}


def main_output(out) -> torch.Tensor:
    return out.logits if "logits" in out else out.last_hidden_state


def test_tiny_archs_table_matches_tests():
    assert sorted(COMBOS) == sorted(EXPECTED_CLASS)


@pytest.mark.parametrize(("arch", "task"), COMBOS)
def test_tiny_forward_shapes(arch, task):
    model = tiny(arch, task, num_labels=3)
    assert type(model).__name__ == EXPECTED_CLASS[arch, task]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out = model(**forward_inputs(arch, task))
    if task == "causal-lm":
        assert out.logits.shape == (2, 5, VOCAB)
    elif task == "seq-cls":
        assert out.logits.shape == (2, 3)
    elif task == "seq2seq":
        assert out.logits.shape == (2, 4, VOCAB)
        assert torch.isfinite(out.loss)
    else:  # base; T5's hidden states are its decoder's, 3 positions long
        assert out.last_hidden_state.shape == (2, 3 if arch == "t5" else 5, 32)


@pytest.mark.parametrize(("arch", "task"), COMBOS)
def test_tiny_outputs_deterministic_in_train_mode(arch, task):
    model = tiny(arch, task)
    assert model.training  # dropout is active in train mode, but every probability is 0
    inputs = forward_inputs(arch, task)
    assert torch.equal(main_output(model(**inputs)), main_output(model(**inputs)))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_seed_controls_weights(arch):
    task = TINY_ARCHS[arch][0]
    a = weights(tiny(arch, task, seed=0))
    b = weights(tiny(arch, task, seed=0))
    c = weights(tiny(arch, task, seed=1))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_tiny_leaves_global_rng_alone():
    state = torch.get_rng_state()
    tiny("llama", seed=123)
    assert torch.equal(state, torch.get_rng_state())


def test_tiny_architecture_details():
    llama = tiny("llama")
    attention = llama.model.layers[0].self_attn
    assert (llama.config.num_attention_heads, llama.config.num_key_value_heads) == (4, 2)
    assert attention.q_proj.out_features == 4 * 8 and attention.k_proj.out_features == 2 * 8

    gpt2 = tiny("gpt2")
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"

    t5 = tiny("t5", "seq2seq")
    assert (t5.config.d_model, t5.config.d_kv, t5.config.d_ff) == (32, 8, 64)


def test_tiny_vocab_size():
    assert tiny("gpt2", vocab_size=50).get_input_embeddings().num_embeddings == 50
    with pytest.raises(ValueError, match="vocab_size=2"):
        tiny("llama", vocab_size=2)


def test_tiny_unknown_arch_names_choices():
    with pytest.raises(ValueError, match="'mamba'") as err:
        tiny("mamba")
    assert all(arch in str(err.value) for arch in TINY_ARCHS)


@pytest.mark.parametrize(
    ("arch", "task"),
    [("bert", "causal-lm"), ("t5", "causal-lm"), ("llama", "seq2seq"), ("gpt2", "bogus")],
)
def test_tiny_unsupported_task_names_choices(arch, task):
    with pytest.raises(ValueError, match=repr(task)) as err:
        tiny(arch, task)
    assert all(valid in str(err.value) for valid in TINY_ARCHS[arch])


# --- load(): argument checks (fast: they fail before anything is read) ------------------------


def test_load_unknown_task_names_choices():
    with pytest.raises(ValueError, match="'classify'") as err:
        load("minilm-l6", task="classify")
    assert all(task in str(err.value) for task in TASKS)


def test_load_seq_cls_needs_num_labels():
    with pytest.raises(ValueError, match="num_labels"):
        load("minilm-l6", task="seq-cls")
    with pytest.raises(ValueError, match="num_labels=3"):
        load("minilm-l6", task="base", num_labels=3)


def test_load_minilm_as_causal_lm_explains_encoder():
    with pytest.raises(ValueError, match="encoder") as err:
        load("minilm-l6", task="causal-lm")
    assert "'base'" in str(err.value) and "'seq-cls'" in str(err.value)


def test_load_smollm2_as_seq2seq_explains_decoder():
    with pytest.raises(ValueError, match="decoder-only"):
        load("smollm2", task="seq2seq")


def test_aliases_cover_both_packaged_models():
    assert {"smollm2-135m-instruct", "smollm2", "minilm-l6", "all-minilm-l6-v2"} <= set(ALIASES)
    assert all(isinstance(text, str) and text for text in ALIASES.values())


# --- load(): local directories and the Hub ----------------------------------------------------


@pytest.fixture
def saved_tiny_llama(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    return model, tmp_path


def test_load_local_directory(saved_tiny_llama):
    original, path = saved_tiny_llama
    model, tokenizer = load(str(path))
    assert type(model).__name__ == "LlamaForCausalLM"
    expected = weights(original)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    # The tokenizer had no pad token: eos stands in and the model agrees on the id.
    assert tokenizer.pad_token == "</s>"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 2


def test_load_local_directory_other_task_and_dtype(saved_tiny_llama):
    _, path = saved_tiny_llama
    model, tokenizer = load(str(path), task="seq-cls", num_labels=3, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    batch = tokenizer(["w3 w4 w5", "w6"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


def test_load_missing_path_is_clear(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(OSError, match="ALIASES") as err:
        load(str(missing))
    assert str(missing) in str(err.value)


def test_load_unreachable_hub_id_is_clear(monkeypatch):
    # Hub offline mode fails at once; a network that is merely unreachable fails the same way,
    # after half a minute of retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="ALIASES") as err:
        load("peftlab-tests/does-not-exist")
    assert "peftlab-tests/does-not-exist" in str(err.value)


# --- load(): the converted-model cache, with a tiny stand-in for the slow GGUF conversion -----


@pytest.fixture
def fake_gguf(monkeypatch):
    """Replace the 30 s GGUF conversion by a tiny model; ``calls`` counts conversions."""
    calls = []

    def convert():
        calls.append(1)
        return tiny("llama"), word_tokenizer()

    monkeypatch.setattr(loaders, "_load_smollm2_gguf", convert)
    return calls


def smollm2_cache(root: Path) -> Path:
    return root / "models" / "smollm2-135m-instruct"


def test_cache_built_once_then_reused(tmp_path, fake_gguf):
    first, _ = load("smollm2", cache_dir=tmp_path)
    cached = smollm2_cache(tmp_path)
    assert all((cached / name).is_file() for name in loaders._CACHE_FILES)
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # no staging left
    second, tokenizer = load("smollm2-135m-instruct", cache_dir=tmp_path)
    assert len(fake_gguf) == 1
    assert tokenizer.chat_template == CHAT_TEMPLATE
    expected = weights(first)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in second.state_dict().items())


def test_incomplete_cache_is_rebuilt(tmp_path, fake_gguf):
    load("smollm2", cache_dir=tmp_path)
    (smollm2_cache(tmp_path) / "model.safetensors").unlink()
    load("smollm2", cache_dir=tmp_path)
    assert len(fake_gguf) == 2
    assert (smollm2_cache(tmp_path) / "model.safetensors").is_file()
    assert sorted(p.name for p in smollm2_cache(tmp_path).parent.iterdir()) == [
        "smollm2-135m-instruct"
    ]


def test_failed_save_leaves_no_cache(tmp_path, fake_gguf, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        load("smollm2", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_cache_location_precedence(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("PEFTLAB_CACHE", raising=False)
    assert loaders._cache_root(None) == tmp_path / "home" / ".cache" / "peftlab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loaders._cache_root(None) == tmp_path / "xdg" / "peftlab"
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "env"))
    load("smollm2")
    assert smollm2_cache(tmp_path / "env").is_dir()
    assert loaders._cache_root(tmp_path / "arg") == tmp_path / "arg"


# --- slow: the real packaged models -----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 loaded once through load() (converting the GGUF into a fresh cache), along with
    the GGUF-loaded model that the cache was written from."""
    cache_dir = tmp_path_factory.mktemp("peftlab-cache")
    converted = []
    convert = loaders._load_smollm2_gguf

    def recording_convert():
        converted.append(convert())
        return converted[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loaders, "_load_smollm2_gguf", recording_convert)
        model, tokenizer = load("smollm2-135m-instruct", cache_dir=cache_dir)
    assert len(converted) == 1
    gguf_model, gguf_tokenizer = converted[0]
    return SimpleNamespace(
        cache_dir=cache_dir,
        model=model.eval(),
        tokenizer=tokenizer,
        gguf_model=gguf_model.eval(),
        gguf_tokenizer=gguf_tokenizer,
    )


@pytest.mark.slow
def test_smollm2_is_a_plain_fp32_model(smollm2):
    for model in (smollm2.gguf_model, smollm2.model):
        assert getattr(model, "hf_quantizer", None) is None
        assert getattr(model.config, "quantization_config", None) is None
        assert not getattr(model, "is_quantized", False)
        assert getattr(model, "quantization_method", None) is None
        assert all(p.dtype == torch.float32 for p in model.parameters())
    config_text = (smollm2_cache(smollm2.cache_dir) / "config.json").read_text()
    assert "quantization_config" not in config_text


@pytest.mark.slow
def test_smollm2_second_load_comes_from_cache(smollm2, monkeypatch):
    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was read although a complete cache exists")

    monkeypatch.setattr(loaders, "_smollm2_gguf_path", no_gguf)
    monkeypatch.setattr(loaders, "_load_smollm2_gguf", no_gguf)
    model, _ = load("smollm2", cache_dir=smollm2.cache_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    cached = smollm2_cache(smollm2.cache_dir)
    assert all((cached / name).is_file() for name in loaders._CACHE_FILES)


@pytest.mark.slow
def test_smollm2_cached_logits_equal_gguf_logits(smollm2):
    prompt = smollm2.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        cached = smollm2.model(**prompt).logits
        direct = smollm2.gguf_model(**prompt).logits
    assert torch.equal(cached, direct)
    # A sanity check that the weights are the real ones, not merely equal: the top next token.
    assert smollm2.tokenizer.decode(cached[0, -1].argmax()).strip() == "Paris"


@pytest.mark.slow
def test_smollm2_embeddings_stay_tied(smollm2):
    model = smollm2.model
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.slow
def test_smollm2_tokenizer_survives_cache(smollm2):
    tokenizer = smollm2.tokenizer
    assert tokenizer.chat_template == smollm2.gguf_tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert tokenizer.pad_token_id is not None
    assert smollm2.model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.slow
def test_smollm2_is_trainable(smollm2):
    # The check Trainer runs first: it rejects models still marked as quantized.
    validate_quantization_for_training(smollm2.model)
    assert all(p.requires_grad for p in smollm2.model.parameters())


@pytest.fixture(scope="module")
def minilm():
    return load("minilm-l6", task="base")


@pytest.mark.slow
def test_minilm_seq_cls_head(minilm):
    _, tokenizer = minilm
    model, _ = load("all-minilm-l6-v2", task="seq-cls", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    batch = tokenizer(["a short one", "a longer sentence here"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


@pytest.mark.slow
def test_minilm_embeddings_capture_meaning(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    sentences = [
        "A man is playing a guitar.",
        "Someone is playing an instrument.",
        "The stock market fell sharply today.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    related, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert related > unrelated + 0.2
