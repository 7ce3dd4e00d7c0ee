"""The continuous-batching engine against model.generate() run alone, row by row."""

import shutil
import threading

import pytest
import torch

from peftlab import formats
from peftlab.formats import AdapterLoadError
from peftlab.serve import AdapterNotFound, QueueFull, SamplingParams

from .conftest import make_engine

GREEDY = SamplingParams(max_tokens=10, temperature=0)
PROMPTS = {"a": "w1 w2 w3 w4 w5", "b": "w40 w41 w42", "c": "w30 w31 w32 w33", "base": "w7"}


def alone(reference, engine, ids: list[int], adapter: str, max_tokens: int) -> list[int]:
    """Greedy tokens of model.generate for one prompt, up to and including the first stop token."""
    out = reference.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             adapter_names=["__base__" if adapter == "base" else adapter], do_sample=False,
                             max_new_tokens=max_tokens, eos_token_id=sorted(engine.stop_ids), pad_token_id=0)
    return out[0, len(ids):].tolist()


def run(engine) -> None:
    while engine.stats["running"] or engine.stats["waiting"]:
        engine.step()


class Recorder:
    """Sink that keeps a request's events."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def text(self):
        return "".join(e.text for e in self.events)


@pytest.fixture
def engine(adapter_root, tokenizer):
    engine = make_engine(adapter_root, tokenizer)
    # Record the adapters of every forward, to see that decode steps really mixed them.
    calls, forward = [], engine.store.forward
    engine.store.forward = lambda adapters, **inputs: (calls.append(list(adapters)), forward(adapters, **inputs))[1]
    engine.calls = calls
    return engine


def test_mixed_batch_with_rows_joining_midway_equals_each_request_alone(engine, reference, tokenizer):
    ids = {name: tokenizer(text)["input_ids"] for name, text in PROMPTS.items()}
    sinks = {name: Recorder() for name in ids}
    requests = {name: engine.submit(ids[name], name, GREEDY, sinks[name]) for name in ("a", "c")}
    for _ in range(3):
        engine.step()
    requests.update({name: engine.submit(ids[name], name, GREEDY, sinks[name]) for name in ("b", "base")})
    run(engine)
    for name, request in requests.items():
        assert request.tokens == alone(reference, engine, ids[name], name, 10), name
        last = sinks[name].events[-1]
        assert last.finish_reason == ("stop" if request.tokens[-1] in engine.stop_ids else "length")
        assert (last.prompt_tokens, last.completion_tokens) == (len(ids[name]), len(request.tokens))
        assert sinks[name].text == tokenizer.decode(request.tokens, skip_special_tokens=True)
    # Decode steps ran one forward over rows of different adapters (and base rows).
    assert any(sorted(c) == ["a", "b", "base", "c"] for c in engine.calls)
    assert engine.stats == {"running": 0, "waiting": 0}


def test_a_failing_request_fails_alone(engine, reference, tokenizer, adapter_root):
    forward = engine.store.forward

    def flaky(adapters, **inputs):  # any decode step that includes a row of adapter "c" raises
        if "c" in adapters and inputs["input_ids"].shape[1] == 1:
            raise RuntimeError("kernel exploded")
        return forward(adapters, **inputs)

    engine.store.forward = flaky
    ids = {name: tokenizer(text)["input_ids"] for name, text in PROMPTS.items()}
    sinks = {name: Recorder() for name in ("a", "b", "c")}
    requests = {name: engine.submit(ids[name], name, GREEDY, sinks[name]) for name in sinks}
    run(engine)
    assert isinstance(sinks["c"].events[-1], RuntimeError)
    for name in ("a", "b"):
        assert requests[name].tokens == alone(reference, engine, ids[name], name, 10)
    # The engine keeps serving the failed request's adapter.
    engine.store.forward = forward
    again = Recorder()
    request = engine.submit(ids["c"], "c", GREEDY, again)
    run(engine)
    assert request.tokens == alone(reference, engine, ids["c"], "c", 10)


def test_an_adapter_that_fails_to_load_fails_only_its_request(adapter_root, tokenizer, reference, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(adapter_root, root)
    config, tensors = formats.read_adapter(root / "a")
    formats.write_adapter(root / "broken", config, {k: v[:1] for k, v in tensors.items()})  # wrong shapes
    engine = make_engine(root, tokenizer)
    ids = tokenizer(PROMPTS["a"])["input_ids"]
    bad, good = Recorder(), Recorder()
    engine.submit(ids, "broken", GREEDY, bad)
    request = engine.submit(ids, "a", GREEDY, good)
    run(engine)
    assert isinstance(bad.events[-1], AdapterLoadError) and "'broken'" in str(bad.events[-1])
    assert request.tokens == alone(reference, engine, ids, "a", 10)


def test_submit_refuses_unknown_adapters_full_queues_and_prompts_too_long(adapter_root, tokenizer):
    engine = make_engine(adapter_root, tokenizer, queue_size=2)
    with pytest.raises(AdapterNotFound, match="'nope' does not exist; models: base, a, b, c"):
        engine.submit([5, 6], "nope", GREEDY, print)
    engine.submit([5, 6], "a", GREEDY, print)
    engine.submit([5, 6], "b", GREEDY, print)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.submit([5, 6], "base", GREEDY, print)
    fresh = make_engine(adapter_root, tokenizer)
    with pytest.raises(ValueError, match="context is 128 tokens"):
        fresh.submit([5] * 120, "a", GREEDY, print)
    with pytest.raises(ValueError, match=r"\[128, -1\] are outside the vocabulary \(0..127\)"):
        fresh.submit([5, 128, -1], "a", GREEDY, print)
    with pytest.raises(ValueError, match="no tokens"):
        fresh.submit([], "a", GREEDY, print)


def test_stop_strings_seeds_and_eviction_under_load(adapter_root, tokenizer, reference):
    # One resident adapter for three adapters' requests: they take turns, none fails.
    engine = make_engine(adapter_root, tokenizer, max_resident=1, max_batch=2).start()
    try:
        ids = tokenizer(PROMPTS["a"])["input_ids"]
        greedy = engine.generate(ids, "a", GREEDY, timeout=30)
        cut = greedy.text.split()[2]
        stopped = engine.generate(ids, "a", SamplingParams(max_tokens=10, temperature=0, stop=(cut,)), timeout=30)
        assert stopped.finish_reason == "stop" and stopped.text == greedy.text[:greedy.text.index(cut)]

        results, threads = {}, []
        for i, name in enumerate(["a", "b", "c", "a", "b", "c"]):
            params = SamplingParams(max_tokens=8, temperature=1.0, seed=i)
            worker = threading.Thread(target=lambda i=i, n=name, p=params: results.__setitem__(
                i, engine.generate(tokenizer(PROMPTS[n])["input_ids"], n, p, timeout=60)))
            threads.append(worker)
            worker.start()
        for worker in threads:
            worker.join()
        assert len(results) == 6
        # The same seed, adapter and prompt sample the same tokens, whatever else ran beside it.
        repeat = engine.generate(tokenizer(PROMPTS["b"])["input_ids"], "b", SamplingParams(max_tokens=8, seed=1),
                                 timeout=30)
        assert repeat.token_ids == results[1].token_ids
    finally:
        engine.stop()


def test_every_module_wrapping_method_batches_with_lora(adapter_root, tokenizer, tmp_path):
    """LoHa, IA3, bottleneck and DoRA adapters share decode steps with LoRA rows, token-exact."""
    from peftlab import BottleneckConfig, IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model

    from .conftest import base_model

    configs = {"loha": LoHaConfig(r=2, target_modules="all-linear", init_weights=False),
               "ia3": IA3Config(init_ia3_weights=False),
               "bottleneck": BottleneckConfig(variant="houlsby", bottleneck=8, init="random"),
               "dora": LoraConfig(target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False)}
    root = tmp_path / "adapters"
    shutil.copytree(adapter_root / "a", root / "a")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, config in configs.items():
            get_peft_model(base_model(), config, name).save_pretrained(root, [name])
    engine = make_engine(root, tokenizer)
    reference = PeftModel.from_pretrained(base_model(), root / "a", "a")
    for name in configs:
        reference.load_adapter(root / name, name)
    ids = tokenizer(PROMPTS["a"])["input_ids"]
    requests = {name: engine.submit(ids, name, GREEDY, lambda event: None) for name in ["a", *configs]}
    run(engine)
    for name, request in requests.items():
        assert request.tokens == alone(reference.eval(), engine, ids, name, 10), name
    assert len({tuple(r.tokens) for r in requests.values()}) == len(requests)  # the adapters really differ
