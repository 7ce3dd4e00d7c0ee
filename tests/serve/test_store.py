"""AdapterStore: names that cannot leave the adapter roots, the LRU of resident adapters, and
re-attaching from the CPU copy."""

import shutil

import pytest
import torch

from peftlab.formats import AdapterLoadError
from peftlab.serve import AdapterBusy, AdapterExists, AdapterNotFound, AdapterPathError, AdapterStore

from .conftest import base_model


@pytest.fixture
def root(adapter_root, tmp_path):
    """A private copy of the adapters, so a test may delete files."""
    copy = tmp_path / "adapters"
    shutil.copytree(adapter_root, copy)
    return copy


def logits(store, adapter):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        return store.forward([adapter], input_ids=ids).logits


def test_folder_of_adapters_and_single_adapter_dir_register_by_folder_name(root, tmp_path):
    assert AdapterStore(base_model(), [root]).names() == ["a", "b", "c"]
    assert AdapterStore(base_model(), [root / "b"]).names() == ["b"]
    with pytest.raises(AdapterExists, match="'b' is taken"):
        AdapterStore(base_model(), [root, root / "b"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AdapterStore(base_model(), [tmp_path / "missing"])
    # Training runs all save to a folder named "adapter": NAME=DIR names them.
    named = AdapterStore(base_model(), [root / "a"], named={"sql": root / "b", "chat": root / "c"})
    assert named.names() == ["a", "chat", "sql"] and named.require("sql") == (root / "b").resolve()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        AdapterStore(base_model(), named={"x": root})


@pytest.mark.parametrize("name", ["../a", "a/../../etc", "/etc", "..", ".hidden", "a b", "base", "__base__"])
def test_names_that_could_escape_or_collide_are_refused(root, name):
    store = AdapterStore(base_model(), [root])
    with pytest.raises(AdapterPathError):
        store.register(name)
    assert store.names() == ["a", "b", "c"]


def test_paths_outside_the_roots_are_refused_even_through_a_symlink(root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(root / "a", outside)
    (root / "sneaky").symlink_to(outside)
    store = AdapterStore(base_model(), [root])
    for name, path in [("x", str(outside)), ("x", "../outside"), ("sneaky", None)]:
        with pytest.raises(AdapterPathError, match="outside the adapter roots"):
            store.register(name, path)
    # Inside the root, by name or by a relative path, is fine.
    shutil.copytree(root / "a", root / "d")
    assert store.register("d") == (root / "d").resolve()
    assert store.register("e", "a") == (root / "a").resolve()
    with pytest.raises(AdapterExists):
        store.register("d")
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        store.register("nothing")


def test_a_directory_that_is_not_an_adapter_is_refused_at_registration(root):
    (root / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        AdapterStore(base_model(), [root]).register("empty")


def test_lru_evicts_the_least_recently_used_idle_adapter(root):
    store = AdapterStore(base_model(), [root], max_resident=2)
    for name in ("a", "b"):
        store.acquire(name)
        store.release(name)
    store.acquire("c")  # full: "a" is the least recently used
    store.release("c")
    assert store.resident == ["b", "c"]
    assert sorted(store.model.peft_config) == ["b", "c"]
    store.acquire("b")  # "b" is now held and the most recent; "c" is idle
    store.acquire("a")  # evicts "c", not the held "b"
    assert store.resident == ["b", "a"]
    with pytest.raises(AdapterBusy, match="max-resident"):
        store.acquire("c")  # both held
    store.release("a")
    store.acquire("c")
    assert store.resident == ["b", "c"]


def test_reattaching_from_the_cpu_copy_gives_the_same_outputs_without_reading_files(root):
    store = AdapterStore(base_model(), [root], max_resident=1)
    store.acquire("a")
    first = logits(store, "a")
    store.release("a")
    assert not torch.allclose(first, logits(store, "base"))  # the adapter changes the output
    store.acquire("b")
    store.release("b")
    assert store.resident == ["b"]
    shutil.rmtree(root / "a")  # the CPU copy is all that is left
    store.acquire("a")
    assert store.resident == ["a"]
    assert torch.equal(logits(store, "a"), first)


def test_unregistering_a_held_adapter_detaches_it_when_released(root):
    store = AdapterStore(base_model(), [root])
    store.acquire("a")
    store.unregister("a")
    assert store.names() == ["b", "c"] and store.resident == ["a"]
    with pytest.raises(AdapterNotFound, match="'a' does not exist"):
        store.acquire("a")
    with pytest.raises(AdapterExists, match="being unloaded"):
        store.register("a")
    store.release("a")
    assert store.resident == [] and "a" not in store.model.peft_config
    store.register("a")
    store.acquire("a")
    assert store.resident == ["a"]


def test_an_adapter_that_does_not_fit_the_model_fails_and_leaves_the_model_as_it_was(root):
    from peftlab import LoraConfig, get_peft_model
    from peftlab.models import tiny

    get_peft_model(tiny("gpt2"), LoraConfig(target_modules=["c_attn"]), "other").save_pretrained(root / "gpt2",
                                                                                               ["other"])
    store = AdapterStore(base_model(), [root])
    store.register("other", "gpt2/other")
    with pytest.raises(AdapterLoadError, match="adapter 'other' .* does not fit the base model LlamaForCausalLM: "
                                               "target_modules=.'c_attn'"):
        store.acquire("other")
    assert store.resident == []
    store.acquire("a")
    assert store.resident == ["a"]


def test_prompt_prefix_and_llama_adapters_take_turns_on_the_model(family_root, family_reference):
    """Model-level adapters attach and evict like the others; with the virtual tokens put in front
    (``with_virtual_tokens``), a forward equals PeftModel.forward; after them, base is base again."""
    store = AdapterStore(base_model(), [family_root], max_resident=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    base = logits(store, "base")
    for name in ("prompt2", "ptuning5", "prefix3", "llama3"):
        store.acquire(name)
        with torch.no_grad():
            got = store.forward([name], **store.with_virtual_tokens([name], input_ids=ids)).logits
            expected = family_reference(input_ids=ids, adapter_names=[name]).logits
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5), name
        assert not torch.allclose(got[:, -4:], base, atol=1e-3), name
        store.release(name)
    store.acquire("a")  # evicts the last model-level adapter
    assert store.resident == ["a"] and len(store.model.model_adapters) == 0
    assert torch.allclose(logits(store, "base"), base, atol=1e-6)


def test_a_bf16_base_serves_its_adapters_in_bf16(root):
    """Training keeps fp32 adapters on a half-precision base (autocast_adapter_dtype); the server
    does not train, so the adapters it attaches take the base's dtype and its layers stay bf16."""
    store = AdapterStore(base_model().to(torch.bfloat16), [root])
    store.acquire("a")
    out = logits(store, "a")
    store.release("a")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert {t.dtype for t in store.model.adapter_state_dict("a").values()} == {torch.bfloat16}
