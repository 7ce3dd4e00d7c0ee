"""merge_to_dir: the merged directory, read by plain transformers, computes what the adapter did."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from peftlab import ConfigError, IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from peftlab.export import load_adapted, merge_to_dir
from peftlab.models import tiny
from tests.helpers import chat_tokenizer

WORDS = ["hello", "world", "how", "are", "you", "fine"]


def save_base(directory: Path) -> Path:
    """A tiny random Llama and a word-level chat tokenizer, saved as a local base model directory."""
    tokenizer = chat_tokenizer(WORDS)
    tiny("llama", "causal-lm", vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_adapter(base_dir: Path, directory: Path, config, task: str = "causal-lm", **kwargs) -> Path:
    model = tiny_from(base_dir, task, **kwargs)
    get_peft_model(model, config).save_pretrained(directory)
    return directory


def tiny_from(base_dir: Path, task: str, **kwargs):
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return auto.from_pretrained(base_dir, **kwargs)


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 4 + len(WORDS), (2, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def base_dir(tmp_path):
    return save_base(tmp_path / "base")


def test_merged_lora_loads_in_plain_transformers_and_matches(base_dir, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    adapter = save_adapter(base_dir, tmp_path / "adapter", config)
    out = merge_to_dir(str(base_dir), adapter, tmp_path / "merged", max_shard_size="20KB")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not list(tmp_path.glob(".merged.*")), "no staging directory is left behind"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, _ = load_adapted(str(base_dir), adapter)
    with torch.no_grad():
        expected = adapted.eval()(**inputs()).logits
        got = merged(**inputs()).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()(**inputs()).logits
    assert (got - expected).abs().max() <= 1e-5
    assert (got - base).abs().max() > 1e-3, "the adapter changes the output, so the check can fail"
    assert AutoTokenizer.from_pretrained(out).get_vocab() == chat_tokenizer(WORDS).get_vocab()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_classifier_keeps_its_trained_head_and_label_count(base_dir, tmp_path):
    config = IA3Config(init_ia3_weights=False, task_type="SEQ_CLS")
    # A 3-way classifier trained on a causal LM's backbone: the label count comes from the adapter's head.
    adapter = save_adapter(base_dir, tmp_path / "adapter", config, task="seq-cls", num_labels=3)
    out = merge_to_dir(str(base_dir), adapter, tmp_path / "merged")

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    adapted, _ = load_adapted(str(base_dir), adapter)
    with torch.no_grad():
        expected = adapted.eval()(**inputs()).logits
        got = merged(**inputs()).logits
    assert got.shape == (2, 3)
    assert (got - expected).abs().max() <= 1e-5


def test_tied_embedding_is_untied_when_only_one_side_is_adapted(tmp_path):
    tokenizer = chat_tokenizer(WORDS)
    base_dir = tmp_path / "base"
    config = tiny("llama", "causal-lm", vocab_size=len(tokenizer)).config
    config.tie_word_embeddings = True  # as in SmolLM2
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lora = LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")

    out = merge_to_dir(str(base_dir), tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, _ = load_adapted(str(base_dir), tmp_path / "adapter")
    with torch.no_grad():
        # The head keeps the original embedding: merged into the shared tensor, ΔW would reach it too.
        assert (merged(**inputs()).logits - adapted.eval()(**inputs()).logits).abs().max() <= 1e-5
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_saved_dtype(base_dir, tmp_path):
    adapter = save_adapter(base_dir, tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    out = merge_to_dir(str(base_dir), adapter, tmp_path / "merged", dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        merge_to_dir(str(base_dir), adapter, tmp_path / "other", dtype="int8")


def test_non_mergeable_method_is_refused_with_the_way_out(base_dir, tmp_path):
    adapter = save_adapter(base_dir, tmp_path / "adapter", PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match=r"prompt adapter, which has no weight delta.*serve it unmerged"):
        merge_to_dir(str(base_dir), adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_existing_output_is_kept_unless_overwrite(base_dir, tmp_path):
    adapter = save_adapter(base_dir, tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty.*--overwrite"):
        merge_to_dir(str(base_dir), adapter, out)
    assert (out / "notes.txt").read_text() == "mine"

    merge_to_dir(str(base_dir), adapter, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]

    with pytest.raises(ConfigError, match="is also an input"):
        merge_to_dir(str(base_dir), adapter, adapter, overwrite=True)


@pytest.mark.slow
def test_merged_smollm2_reloads_with_plain_transformers(tmp_path):
    """The bundled model comes from a GGUF file; its merged copy must be an ordinary checkpoint."""
    from peftlab.models import load

    model, tokenizer = load("smollm2")
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    out = merge_to_dir("smollm2", tmp_path / "adapter", tmp_path / "merged", max_shard_size="200MB")

    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and not any("gguf" in key for key in saved)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, _ = load_adapted("smollm2", tmp_path / "adapter")
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        got, expected = merged(**ids).logits, adapted.eval()(**ids).logits
        base = load("smollm2")[0].eval()(**ids).logits
    # Logits of size ~20 through 30 layers in fp32: merged and unmerged agree to ~1e-5 relative.
    assert (got - expected).abs().max() <= 1e-3
    assert (got - base).abs().max() > 0.1, "the adapter changes the output, so the check can fail"
