"""Shared pieces of the serving tests: a tiny llama, a word-level chat tokenizer, three LoRA
adapters on disk that really differ (B random, not zero), and adapters of the prompt-type and
attention families (two of each, of different lengths, so a batch pads virtual tokens)."""

import shutil
from pathlib import Path

import pytest
import torch

from peftlab import (LlamaAdapterConfig, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, PTuningConfig,
                     get_peft_model)
from peftlab.models import tiny
from peftlab.serve import AdapterStore, Engine
from tests.helpers import chat_tokenizer

# 7 special tokens + 121 words = the tiny model's 128 ids, so every id decodes to a word.
WORDS = [f"w{i}" for i in range(121)]
ADAPTERS = {
    "a": LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "b": LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False),
    "c": LoraConfig(target_modules=["o_proj", "down_proj"], r=2, lora_alpha=16, init_lora_weights=False),
}

FAMILIES = {
    "prompt": {"prompt2": PromptTuningConfig(num_virtual_tokens=2),
               "ptuning5": PTuningConfig(num_virtual_tokens=5, encoder_hidden_size=16)},
    "prefix": {"prefix3": PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
               "ptv2_5": PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=False)},
    # gate_init != 0: a zero gate (the paper's init) would compute exactly the base model.
    "llama_adapter": {"llama3": LlamaAdapterConfig(adapter_len=3, gate_init=0.5),
                      "llama2": LlamaAdapterConfig(adapter_len=2, adapter_layers=1, gate="tanh_per_head",
                                                   gate_init=-0.8)},
}
"""Virtual tokens in the input (prompt tuning, P-tuning), prefix keys/values in every layer
(prefix tuning, P-tuning v2), gated adaption prompts (LLaMA-Adapter)."""


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Tiny models: one intra-op thread. With two on a busy 2-core machine, every small op waits for
    a second core and a decode step of the tiny llama goes from ~10 ms to ~1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_model():
    return tiny("llama", seed=0).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return chat_tokenizer(WORDS)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    """<root>/a, <root>/b, <root>/c: adapter directories of the tiny llama."""
    root = tmp_path_factory.mktemp("adapters")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = None
        for name, config in ADAPTERS.items():
            if model is None:
                model = get_peft_model(base_model(), config, name)
            else:
                model.add_adapter(name, config)
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def reference(adapter_root):
    """A separate PeftModel with the same adapters, for model.generate()."""
    model = PeftModel.from_pretrained(base_model(), adapter_root / "a", "a")
    for name in ("b", "c"):
        model.load_adapter(adapter_root / name, name)
    return model.eval()


def make_engine(root: Path, tokenizer, *, max_resident: int = 8, **options) -> Engine:
    return Engine(AdapterStore(base_model(), [root], max_resident=max_resident), tokenizer, **options)


@pytest.fixture(scope="session")
def family_root(adapter_root, tmp_path_factory) -> Path:
    """LoRA adapter "a" and every adapter of :data:`FAMILIES`, each in its own directory."""
    root = tmp_path_factory.mktemp("families")
    shutil.copytree(adapter_root / "a", root / "a")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        for adapters in FAMILIES.values():
            for name, config in adapters.items():
                get_peft_model(base_model(), config, name).save_pretrained(root, [name])
    return root


@pytest.fixture(scope="session")
def family_reference(family_root):
    """One PeftModel holding every adapter of ``family_root``, for model.generate()."""
    model = PeftModel.from_pretrained(base_model(), family_root / "a", "a")
    for adapters in FAMILIES.values():
        for name in adapters:
            model.load_adapter(family_root / name, name)
    return model.eval()
