"""StackCache: reused while frozen sources are unchanged, rebuilt on any change, never for
tensors being trained; and LoRA's mixed batches stay exact across loads, deletes and steps."""

import torch
import torch.nn as nn

from peftlab import BASE, LoraConfig, get_peft_model
from peftlab.ops import StackCache


def test_reused_until_a_source_changes():
    a, b = torch.ones(3), torch.zeros(3)
    cache = StackCache()
    assert cache.lookup(("x",)) is None
    value = object()
    cache.store(("x",), [a, b], value)
    assert cache.lookup(("x",)) is value
    assert cache.lookup(("y",)) is None  # another key

    with torch.no_grad():
        a.add_(1)  # in place: the version counter moves
    assert cache.lookup(("x",)) is None

    cache.store(("x",), [a, b], value)
    a.data = torch.full((3,), 5.0)  # new storage, same object
    assert cache.lookup(("x",)) is None

    cache.store(("x",), [a, b], value)
    b.requires_grad_()  # about to be trained: the stack must join the autograd graph
    assert cache.lookup(("x",)) is None


def test_sources_are_checked_once_per_token():
    """The token is the forward's route: layers of one forward (or of one generate call) skip the
    checks after the first; the next forward checks again."""
    a = torch.ones(3)
    cache, value, route, next_route = StackCache(), object(), object(), object()
    cache.store(("x",), [a], value, route)
    with torch.no_grad():
        a.add_(1)
    assert cache.lookup(("x",), route) is value
    assert cache.lookup(("x",), next_route) is None


def test_sources_requiring_grad_are_never_stored():
    cache = StackCache()
    cache.store(("x",), [torch.ones(3), torch.ones(3, requires_grad=True)], object())
    assert cache.lookup(("x",)) is None


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 12)

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids))


def frozen_lora_model(names=("a", "b", "c")):
    model = get_peft_model(Toy(), LoraConfig(r=4, target_modules=["lin"], init_lora_weights=False), names[0])
    for i, n in enumerate(names[1:]):
        model.add_adapter(n, LoraConfig(r=2 + 2 * i, target_modules=["lin"], init_lora_weights=False))
    model.requires_grad_(False)  # as served: adapters loaded with is_trainable=False
    return model


def separate(model, ids, rows):
    out = []
    for i, name in enumerate(rows):
        if name == BASE:
            with model.disable_adapter():
                out.append(model(input_ids=ids[i:i + 1])[0])
        else:
            model.set_adapter(name)
            out.append(model(input_ids=ids[i:i + 1])[0])
    return torch.stack(out)


def test_lora_mixed_batches_follow_loads_and_deletes_of_cached_adapters():
    model = frozen_lora_model()
    ids = torch.randint(0, 20, (4, 3), generator=torch.Generator().manual_seed(1))
    rows = ["a", "c", BASE, "b"]
    layer = dict(model.adapter_layers())["lin"]
    with torch.no_grad():
        first = model(input_ids=ids, adapter_names=rows)
        torch.testing.assert_close(first, separate(model, ids, rows), atol=1e-6, rtol=1e-5)
        stack = layer._stacks.lookup(("a", "c", "b"))
        assert stack is not None
        model(input_ids=ids, adapter_names=rows)
        assert layer._stacks.lookup(("a", "c", "b")) is stack  # reused

        # a load copies into the adapter's tensors
        state = {k: torch.randn_like(v) for k, v in model.adapter_state_dict("c").items()}
        model.load_adapter_state_dict("c", state)
        after_load = model(input_ids=ids, adapter_names=rows)
        assert not torch.allclose(after_load[1], first[1])
        torch.testing.assert_close(after_load, separate(model, ids, rows), atol=1e-6, rtol=1e-5)

        # deleted and re-added under the same name: new tensors
        model.delete_adapter("b")
        assert layer._stacks.lookup(("a", "c", "b")) is None
        model.add_adapter("b", LoraConfig(r=8, target_modules=["lin"], init_lora_weights=False))
        model.requires_grad_(False)
        torch.testing.assert_close(model(input_ids=ids, adapter_names=rows), separate(model, ids, rows),
                                   atol=1e-6, rtol=1e-5)


def test_trainable_adapters_see_every_optimizer_step_in_no_grad_eval():
    model = get_peft_model(Toy(), LoraConfig(r=4, target_modules=["lin"], init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 20, (2, 3), generator=torch.Generator().manual_seed(2))
    rows = ["a", "b"]
    for _ in range(2):
        model(input_ids=ids, adapter_names=rows).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, adapter_names=rows), separate(model, ids, rows),
                                       atol=1e-6, rtol=1e-5)
