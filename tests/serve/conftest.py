"""Shared pieces of the serving tests: a tiny llama, a word-level chat tokenizer, three LoRA
adapters on disk that really differ (B random, not zero)."""

from pathlib import Path

import pytest
import torch

from peftlab import LoraConfig, PeftModel, get_peft_model
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
