"""A live server on 127.0.0.1 (uvicorn in a thread), called with the official openai client."""

import threading

import openai
import pytest
import torch

from peftlab.serve.app import create_app
from peftlab.serve.server import background

from .conftest import make_engine

KEY = "live-key"


@pytest.fixture(scope="module")
def server(adapter_root, tokenizer):
    engine = make_engine(adapter_root, tokenizer)
    # Record each forward's adapters, to see requests of different adapters share decode steps.
    forward, engine.calls = engine.store.forward, []
    engine.store.forward = lambda adapters, **inputs: (engine.calls.append(list(adapters)), forward(adapters, **inputs))[1]
    engine.start()
    try:
        with background(create_app(engine, api_key=KEY)) as url:
            yield url, engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def greedy_reply(reference, tokenizer, engine, prompt_ids, adapter, max_tokens):
    """What model.generate alone says, decoded (up to and without the stop token)."""
    ids = torch.tensor([prompt_ids])
    out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             adapter_names=["__base__" if adapter == "base" else adapter], max_new_tokens=max_tokens,
                             eos_token_id=sorted(engine.stop_ids), pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list()] == ["base", "a", "b", "c"]


def test_completion_equals_generate_alone(client, server, reference, tokenizer):
    result = client.completions.create(model="a", prompt="w1 w2 w3", max_tokens=6, temperature=0)
    ids = tokenizer("w1 w2 w3")["input_ids"]
    assert result.choices[0].text == greedy_reply(reference, tokenizer, server[1], ids, "a", 6)
    assert result.usage.prompt_tokens == 3 and 1 <= result.usage.completion_tokens <= 6


def test_chat_and_streaming_chat_agree(client):
    messages = [{"role": "system", "content": "w8"}, {"role": "user", "content": "w3 w4"}]
    whole = client.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0)
    reply = whole.choices[0].message
    assert reply.role == "assistant" and whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_unknown_model_and_wrong_key_raise_the_clients_errors(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "w1"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.completions.create(model="a", prompt="w1", max_tokens=0)


def test_concurrent_requests_for_different_adapters_equal_their_sequential_results(client, server):
    jobs = [(name, f"w{10 + i} w{20 + i}") for i, name in enumerate(["a", "b", "c", "base", "a", "b", "c", "base"])]

    def ask(job):
        name, prompt = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    sequential = [ask(job) for job in jobs]
    concurrent = [None] * len(jobs)
    threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(i, ask(jobs[i]))) for i in range(len(jobs))]
    server[1].calls.clear()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert concurrent == sequential
    assert max(len(set(adapters)) for adapters in server[1].calls) >= 2
