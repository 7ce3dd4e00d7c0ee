"""One client's round of local training, without Flower."""

import numpy as np
import pytest
import torch

from peftlab.fed.task import _gradient_hooks, client_seed, local_update, to_numpy, with_rank

from .common import bert_task, rows


def test_fedprox_hook_adds_mu_times_the_distance_to_the_global_weights():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    anchor = {"w": torch.tensor([0.5, 0.0, 3.0])}
    handles = _gradient_hooks({"w": w}, frozen=0, factors=set(), anchor=anchor, mu=0.2, grad_accum=2)
    c = torch.tensor([1.0, 1.0, -1.0])
    (w * c).sum().backward()  # one of the step's 2 micro-batches
    torch.testing.assert_close(w.grad, c + 0.2 / 2 * (w.detach() - anchor["w"]))
    for h in handles:
        h.remove()


def test_local_update_returns_the_trained_adapter_and_its_weight():
    task = bert_task(steps=3)
    model = task.new_model()
    start = to_numpy(model.adapter_state_dict())
    arrays, metrics = local_update(model, task, start, rows(10, 0), seed=client_seed(0, 1, 0))
    assert set(arrays) == set(start) and all(a.dtype == np.float32 for a in arrays.values())
    assert metrics["num-examples"] == 10 and np.isfinite(metrics["train-loss"])
    moved = [k for k in start if not np.array_equal(arrays[k], start[k])]
    assert any(k.endswith("lora_B.weight") for k in moved) and any("classifier" in k for k in moved)
    again, _ = local_update(task.new_model(), task, start, rows(10, 0), seed=client_seed(0, 1, 0))
    for k in arrays:  # deterministic in (global state, rows, seed)
        np.testing.assert_array_equal(again[k], arrays[k])


def test_stack_client_trains_fresh_directions_over_a_frozen_global():
    task = bert_task(aggregation="stack", steps=3)
    r = task.adapter.r
    global_model = task.new_model()
    torch.manual_seed(1)
    with torch.no_grad():  # a non-trivial global adapter of rank 2r
        global_model.add_adapter("wide", with_rank(task.adapter, 2 * r))
        for t in global_model.adapter_state_dict("wide").values():
            t.normal_()
    start = to_numpy(global_model.adapter_state_dict("wide"))
    model = task.new_model()
    arrays, _ = local_update(model, task, start, rows(10, 0), seed=3)
    trained = to_numpy(model.adapter_state_dict())
    for key, value in start.items():
        if key.endswith("lora_A.weight"):
            assert arrays[key].shape == (r, value.shape[1])
            np.testing.assert_array_equal(trained[key][: 2 * r], value)  # frozen
        elif key.endswith("lora_B.weight"):
            assert arrays[key].shape == (value.shape[0], r)
            np.testing.assert_array_equal(trained[key][:, : 2 * r], value)
    assert model.peft_config["default"].scaling == task.adapter.scaling  # the scale survives the wider rank


def test_exact_aggregation_needs_plain_lora():
    from peftlab import IA3Config

    with pytest.raises(ValueError, match="re-factorises LoRA"):
        bert_task(aggregation="svd", adapter=IA3Config(target_modules=["query"], feedforward_modules=[]))
