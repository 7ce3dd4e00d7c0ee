"""Prompt-type and attention adapters in the continuous batch: virtual tokens in the KV cache,
prefix keys/values and gated prompts per row, mixed with LoRA and base rows — each request's
greedy tokens equal model.generate for that request alone."""

import shutil

import pytest

from peftlab import MultitaskPromptConfig, get_peft_model
from peftlab.formats import AdapterLoadError
from peftlab.serve import SamplingParams

from .conftest import FAMILIES, base_model, make_engine
from .test_engine import Recorder, alone, run

GREEDY = SamplingParams(max_tokens=10, temperature=0)
TEXTS = ["w1 w2 w3 w4 w5 w6", "w40", "w30 w31 w32", "w7 w8", "w50 w51 w52 w53", "w60 w61 w62 w63 w64 w65 w66"]


def recording(engine):
    """Record the adapters of every forward, to see that steps really mixed them."""
    calls, forward = [], engine.store.forward
    engine.store.forward = lambda adapters, **inputs: (calls.append(sorted(adapters)), forward(adapters, **inputs))[1]
    return calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_mixed_with_lora_and_base_rows_equals_each_request_alone(family, family_root, family_reference,
                                                                          tokenizer):
    first, second = FAMILIES[family]
    engine = make_engine(family_root, tokenizer)
    calls = recording(engine)
    # Two adapters of one family with different numbers of virtual tokens, prompts of different
    # lengths (padding inside the text too), and the same adapter on two rows; rows join midway.
    jobs = [(first, TEXTS[0]), (second, TEXTS[1]), ("a", TEXTS[2]),
            ("base", TEXTS[3]), (first, TEXTS[4]), (second, TEXTS[5])]
    ids = [tokenizer(text)["input_ids"] for _, text in jobs]
    requests = [engine.submit(ids[i], name, GREEDY, Recorder()) for i, (name, _) in enumerate(jobs[:3])]
    for _ in range(3):
        engine.step()
    requests += [engine.submit(ids[i], name, GREEDY, Recorder()) for i, (name, _) in enumerate(jobs) if i >= 3]
    run(engine)
    for (name, text), prompt, request in zip(jobs, ids, requests):
        expected = alone(family_reference, engine, prompt, name, 10)
        assert request.tokens == expected, (name, text)
        if name in (first, second):  # the adapter really changes the output
            assert expected != alone(family_reference, engine, prompt, "base", 10), name
    assert any({first, second, "a", "base"} <= set(c) for c in calls)  # one decode step held them all
    assert engine.stats == {"running": 0, "waiting": 0}


def test_every_family_in_one_batch_with_adapters_taking_turns(family_root, family_reference, tokenizer):
    """All families at once, fewer resident slots than adapters: model-level adapters are attached
    and detached between steps while others decode, and a decode failure of one row stays its own."""
    names = ["a", "base"] + [name for adapters in FAMILIES.values() for name in adapters]
    engine = make_engine(family_root, tokenizer, max_resident=4, max_batch=5)
    calls = recording(engine)
    forward = engine.store.forward

    def flaky(adapters, **inputs):  # decode steps holding a "prefix3" row raise
        if "prefix3" in adapters and inputs["input_ids"].shape[1] == 1 and flaky.armed:
            raise RuntimeError("kernel exploded")
        return forward(adapters, **inputs)

    flaky.armed = True
    engine.store.forward = flaky
    ids = {name: tokenizer(TEXTS[i % len(TEXTS)])["input_ids"] for i, name in enumerate(names)}
    sinks = {name: Recorder() for name in names}
    requests = {name: engine.submit(ids[name], name, GREEDY, sinks[name]) for name in names}
    run(engine)
    assert isinstance(sinks["prefix3"].events[-1], RuntimeError)
    for name in names:
        if name != "prefix3":
            assert requests[name].tokens == alone(family_reference, engine, ids[name], name, 10), name
    assert max(len(set(c) - {"base"}) for c in calls) >= 3  # decode steps mixed adapters of several families
    flaky.armed = False
    again = engine.submit(ids["prefix3"], "prefix3", GREEDY, Recorder())
    run(engine)
    assert again.tokens == alone(family_reference, engine, ids["prefix3"], "prefix3", 10)


def test_sampling_with_a_seed_is_the_same_beside_other_rows(family_root, tokenizer):
    engine = make_engine(family_root, tokenizer)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    ids = tokenizer(TEXTS[2])["input_ids"]
    alone_request = engine.submit(ids, "ptuning5", params, Recorder())
    run(engine)
    crowd = [engine.submit(tokenizer(t)["input_ids"], n, GREEDY, Recorder())
             for t, n in zip(TEXTS, ["prompt2", "prefix3", "base", "llama3"])]
    beside = engine.submit(ids, "ptuning5", params, Recorder())
    run(engine)
    assert beside.tokens == alone_request.tokens and all(r.done for r in crowd)


def test_adapters_that_need_per_row_inputs_are_refused_with_the_reason(family_root, tmp_path, tokenizer):
    root = tmp_path / "adapters"
    shutil.copytree(family_root / "a", root / "a")
    config = MultitaskPromptConfig(num_virtual_tokens=2, num_tasks=2)
    get_peft_model(base_model(), config, "multi").save_pretrained(root, ["multi"])
    engine = make_engine(root, tokenizer)
    with pytest.raises(AdapterLoadError, match=r"multitask adapter, which needs \['task_ids'\]"):
        engine.store.acquire("multi")
    assert engine.store.resident == [] and "multi" not in getattr(engine.store.model, "peft_config", {})
    ids = tokenizer(TEXTS[0])["input_ids"]
    bad, good = Recorder(), Recorder()
    engine.submit(ids, "multi", GREEDY, bad)
    request = engine.submit(ids, "a", GREEDY, good)
    run(engine)
    assert isinstance(bad.events[-1], AdapterLoadError) and request.done and good.events[-1].finish_reason


def test_virtual_tokens_enter_the_cache_once(family_root, tokenizer):
    """A prompt-tuning row's cache holds its virtual tokens and its text; decode steps add one column."""
    engine = make_engine(family_root, tokenizer)
    ids = tokenizer(TEXTS[1])["input_ids"]
    request = engine.submit(ids, "ptuning5", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), Recorder())
    engine.step()  # prefill + one decode step
    assert request.length == FAMILIES["prompt"]["ptuning5"].num_virtual_tokens + len(ids) + 1
    assert engine._cache.get_seq_length() == request.length
    run(engine)
    assert len(request.tokens) == 4
