"""The invariant matrix: every method × every applicable tiny architecture (STYLE.md §9)."""


import pytest
import torch

from peftlab import BASE, PeftModel, get_peft_model
from tests.conftest import make_inputs, output_of
from tests.methods.cases import CASES

MATRIX = [(m, a) for m, case in CASES.items() for a in case.archs]
IDS = [f"{m}-{a}" for m, a in MATRIX]
TOL = dict(atol=1e-5, rtol=1e-5)


def extra_inputs(model, batch: int) -> dict:
    """Per-row inputs the model's adapters need besides the text (a Case's ``extra_inputs``)."""
    out = {}
    for config in getattr(model, "peft_config", {}).values():  # CASES is keyed by method name
        case = CASES.get(config.method)
        if case is not None and case.extra_inputs is not None:
            out.update(case.extra_inputs(batch))
    return out


def inputs_for(model, arch):
    inputs = make_inputs(arch)
    return {**inputs, **extra_inputs(model, inputs["input_ids"].shape[0])}


def run(model, arch, **kw):
    inputs = inputs_for(model, arch)
    with torch.no_grad():
        return output_of(model(**inputs, **kw), inputs)


IDENTITY_AT_INIT = [(m, a) for m, a in MATRIX if CASES[m].init_config is not None]


@pytest.mark.parametrize("method,arch", IDENTITY_AT_INIT, ids=[f"{m}-{a}" for m, a in IDENTITY_AT_INIT])
def test_default_init_equals_base(method, arch, tiny_model):
    case = CASES[method]
    base = tiny_model(arch)
    expected = run(base, arch)
    model = get_peft_model(base, case.init_config(arch))
    torch.testing.assert_close(run(model, arch), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method,arch", MATRIX, ids=IDS)
def test_disable_equals_base_and_adapter_changes_output(method, arch, tiny_model):
    base = tiny_model(arch)
    expected = run(base, arch)
    model = get_peft_model(base, CASES[method].make(arch, 0))
    assert (run(model, arch) - expected).abs().max() > 1e-4, "the test adapter should change the output"
    with model.disable_adapter():
        torch.testing.assert_close(run(model, arch), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method,arch", MATRIX, ids=IDS)
def test_merge_unmerge(method, arch, tiny_model):
    case = CASES[method]
    base = tiny_model(arch)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, case.make(arch, 0))
    unmerged = run(model, arch)
    if not case.mergeable:
        with pytest.raises(Exception, match="cannot be merged"):
            model.merge_adapter()
        return
    model.merge_adapter()
    merged = run(model, arch)
    torch.testing.assert_close(merged, unmerged, **TOL)
    model.merge_adapter()  # idempotent: a second merge changes nothing
    torch.testing.assert_close(run(model, arch), merged, atol=0, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model, arch), unmerged, **TOL)
    for k, v in model.base_model.state_dict().items():
        k = k.replace(".base_layer", "")
        if k in before:
            torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    plain = model.merge_and_unload()
    assert not any("base_layer" in n for n, _ in plain.named_modules())
    torch.testing.assert_close(run(plain, arch), unmerged, **TOL)


@pytest.mark.parametrize("method,arch", MATRIX, ids=IDS)
def test_save_load_roundtrip(method, arch, tiny_model, tmp_path):
    model = get_peft_model(tiny_model(arch), CASES[method].make(arch, 0))
    expected = run(model, arch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(run(loaded, arch), expected, atol=0, rtol=0)
    assert loaded.peft_config["default"] == model.peft_config["default"]


@pytest.mark.parametrize("method,arch", MATRIX, ids=IDS)
def test_mixed_batch_equals_separate_runs(method, arch, tiny_model):
    case = CASES[method]
    model = get_peft_model(tiny_model(arch), case.make(arch, 0), adapter_name="a")
    model.add_adapter("b", case.make(arch, 1))
    separate = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        separate[name] = run(model, arch)
    with model.disable_adapter():
        separate[BASE] = run(model, arch)
    rows = ["b", BASE, "a"]
    mixed = run(model, arch, adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], separate[name][i], **TOL)


@pytest.mark.parametrize("method,arch", MATRIX, ids=IDS)
def test_mixed_batch_gradients_equal_separate_runs(method, arch, tiny_model):
    case = CASES[method]
    model = get_peft_model(tiny_model(arch), case.make(arch, 0), adapter_name="a")
    model.add_adapter("b", case.make(arch, 1))
    inputs = inputs_for(model, arch)
    rows = ["a", "b", "a"]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: (t.grad.clone() if t.grad is not None else torch.zeros_like(t))
                for name in ("a", "b") for n, t in model.adapter_state_dict(name).items()}

    mixed = grads(output_of(model(**inputs, adapter_names=rows), inputs).pow(2).sum())
    total = None
    for name in ("a", "b"):
        model.set_adapter(name)
        keep = torch.tensor([r == name for r in rows])
        g = grads(output_of(model(**inputs), inputs)[keep].pow(2).sum())
        total = g if total is None else {k: total[k] + g[k] for k in g}
    for k in mixed:
        # The two runs sum the same terms in different orders; float32 rounding scales with the
        # gradient's size (t5's norms make some entries large), so the tolerance does too.
        scale = max(1.0, total[k].abs().max().item())
        torch.testing.assert_close(mixed[k], total[k], atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("method,arch", MATRIX, ids=IDS)
def test_training_step_touches_only_adapter(method, arch, tiny_model):
    model = get_peft_model(tiny_model(arch), CASES[method].make(arch, 0))
    model.train()
    base_before = {n: p.clone() for n, p in model.base_model.named_parameters() if not p.requires_grad}
    adapter = set(map(id, model.adapter_state_dict().values()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == adapter, "exactly the declared adapter tensors train"
    opt = torch.optim.SGD(trainable, lr=0.1)
    inputs = inputs_for(model, arch)
    output_of(model(**inputs), inputs).pow(2).mean().backward()
    for n, p in model.base_model.named_parameters():
        if id(p) not in adapter:
            assert p.grad is None, f"frozen base parameter {n} got a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    opt.step()
    for n, p in model.base_model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"base parameter {n} changed"


@pytest.mark.parametrize("method,arch", [(m, a) for m, a in MATRIX if a in ("llama", "gpt2")],
                         ids=[i for (m, a), i in zip(MATRIX, IDS) if a in ("llama", "gpt2")])
def test_gradient_checkpointing_same_gradients_mixed_route(method, arch, tiny_model):
    """Recomputation during backward must see the route of the original forward."""
    case = CASES[method]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapter weights in both runs
        model = get_peft_model(tiny_model(arch), case.make(arch, 0), adapter_name="a")
        model.add_adapter("b", case.make(arch, 1))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        inputs = inputs_for(model, arch)
        out = output_of(model(**inputs, adapter_names=["a", "b", BASE]), inputs)
        out.pow(2).mean().backward()
        results.append({k: t.grad.clone() for n in ("a", "b") for k, t in model.adapter_state_dict(n).items()
                        if t.grad is not None})
    assert results[0].keys() == results[1].keys() and results[0]
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,arch", [(m, a) for m, a in MATRIX if a in ("llama", "gpt2")],
                         ids=[i for (m, a), i in zip(MATRIX, IDS) if a in ("llama", "gpt2")])
def test_generate_mixed_equals_separate(method, arch, tiny_model):
    case = CASES[method]
    model = get_peft_model(tiny_model(arch), case.make(arch, 0), adapter_name="a")
    model.add_adapter("b", case.make(arch, 1))
    ids = make_inputs(arch)["input_ids"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
              **extra_inputs(model, len(ids)))
    rows = ["a", "b", BASE]
    mixed = model.generate(input_ids=ids, adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        if name == BASE:
            with model.disable_adapter():
                single = model.generate(input_ids=ids, **kw)
        else:
            model.set_adapter(name)
            single = model.generate(input_ids=ids, **kw)
        assert torch.equal(mixed[i], single[i]), f"row {i} ({name}) generated differently in a mixed batch"


@pytest.mark.parametrize("method,arch", [(m, a) for m, a in MATRIX if a in ("llama", "gpt2")],
                         ids=[i for (m, a), i in zip(MATRIX, IDS) if a in ("llama", "gpt2")])
def test_beam_search_mixed_rows_equal_separate(method, arch, tiny_model):
    """num_beams expands each row; every expanded row must keep its adapter (and its prompt)."""
    case = CASES[method]
    model = get_peft_model(tiny_model(arch), case.make(arch, 0), adapter_name="a")
    model.add_adapter("b", case.make(arch, 1))
    ids = make_inputs(arch)["input_ids"][:2]
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0, attention_mask=torch.ones_like(ids),
              **extra_inputs(model, 2))
    mixed = model.generate(input_ids=ids, adapter_names=["a", "b"], **kw)
    for i, name in enumerate(["a", "b"]):
        model.set_adapter(name)
        single = model.generate(input_ids=ids, **kw)
        assert torch.equal(mixed[i], single[i])


LEARNERS = [m for m in CASES if "llama" in CASES[m].archs]


@pytest.mark.parametrize("method", LEARNERS)
def test_learns_a_synthetic_task(method):
    """Thirty steps lower the loss clearly: every label is token 7, whatever the text, so
    only the adapter can steer the frozen model there. The tiny head is scaled up (at init scale
    0.02 its logits are near-uniform whatever the hidden state)."""
    from peftlab.data import collate
    from peftlab.models import tiny
    from peftlab.train import TrainArgs, train

    torch.manual_seed(0)
    base = tiny("llama", "causal-lm", seed=0)
    with torch.no_grad():
        base.lm_head.weight.mul_(10)
    case = CASES[method]
    make = case.learn_config or case.init_config or (lambda arch: case.make(arch, 0))
    model = get_peft_model(base, make("llama"))
    ids = torch.randint(3, 50, (240, 10), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [{"input_ids": row, "labels": [7] * 10} for row in ids]  # 30 steps of 8 rows, each row once

    def collate_fn(batch):
        return {**collate(batch, pad_id=0), **extra_inputs(model, len(batch))}

    args = TrainArgs(steps=30, batch_size=8, lr=case.learning_rate, progress=False)
    losses = train(model, rows, args=args, collate_fn=collate_fn).losses
    last = sum(losses[-5:]) / 5
    assert last < 0.6 * losses[0], f"{method}: loss did not fall clearly: {losses[0]:.3f} -> {last:.3f}"
