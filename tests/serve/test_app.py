"""The HTTP API through FastAPI's TestClient: status codes, error bodies, OpenAI's shapes."""

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from peftlab import LoraConfig, get_peft_model
from peftlab.models import tiny
from peftlab.serve import SamplingParams
from peftlab.serve.app import create_app

from .conftest import FAMILIES, make_engine
from .test_live import greedy_reply

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def root(adapter_root, tmp_path):
    copy = tmp_path / "adapters"
    shutil.copytree(adapter_root, copy)
    return copy


@pytest.fixture
def engine(root, tokenizer):
    engine = make_engine(root, tokenizer).start()
    yield engine
    engine.stop()


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, api_key=KEY), raise_server_exceptions=False) as client:
        yield client


def post(client, path, body, headers=AUTH):
    return client.post(path, json=body, headers=headers)


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == status
    return body["message"]


def test_api_key_is_required_on_v1_routes_but_not_on_health(client):
    assert "API key" in error_of(client.get("/v1/models"), 401)
    assert "API key" in error_of(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["base", "a", "b", "c"]


def test_unknown_model_is_404_and_names_the_models(client):
    message = error_of(post(client, "/v1/completions", {"model": "zzz", "prompt": "w1"}), 404)
    assert "'zzz' does not exist; models: base, a, b, c" in message


@pytest.mark.parametrize("body, reason", [
    ({"model": "a", "prompt": "w1", "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"model": "a"}, "prompt: Field required"),
    ({"model": "a", "prompt": "w1", "n": 2}, "n=2 is not supported"),
    ({"model": "a", "prompt": "w1", "logprobs": 2}, "logprobs: Extra inputs are not permitted"),
    ({"model": "a", "prompt": "w1", "stop": ["x"] * 5}, "stop takes at most 4"),
    ({"model": "a", "prompt": "w1", "temperature": 3}, "temperature: Input should be less than or equal to 2"),
])
def test_malformed_completion_requests_are_422_with_the_reason(client, body, reason):
    assert reason in error_of(post(client, "/v1/completions", body), 422)


def test_malformed_chat_and_oversized_prompts(client):
    bad_role = {"model": "a", "messages": [{"role": "robot", "content": "w1"}]}
    assert "messages.0.role" in error_of(post(client, "/v1/chat/completions", bad_role), 422)
    assert "messages: List should have at least 1 item" in error_of(
        post(client, "/v1/chat/completions", {"model": "a", "messages": []}), 422)
    too_long = {"model": "a", "prompt": " ".join(["w1"] * 120), "max_tokens": 20}
    assert "context is 128 tokens" in error_of(post(client, "/v1/completions", too_long), 400)


def test_completion_shapes_and_a_list_of_prompts(client):
    single = post(client, "/v1/completions", {"model": "a", "prompt": "w1 w2", "max_tokens": 5, "temperature": 0})
    body = single.json()
    assert body["object"] == "text_completion" and body["model"] == "a"
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
    assert 1 <= body["usage"]["completion_tokens"] <= 5 and body["usage"]["prompt_tokens"] == 2
    both = post(client, "/v1/completions", {"model": "a", "prompt": ["w1 w2", "w9"], "max_tokens": 5,
                                            "temperature": 0}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["text"] == choice["text"]
    assert both["usage"]["prompt_tokens"] == 3


def test_streamed_chat_is_openai_chunks_and_adds_up_to_the_whole_reply(client):
    request = {"model": "b", "messages": [{"role": "user", "content": "w3 w4"}], "max_tokens": 8, "temperature": 0}
    whole = post(client, "/v1/chat/completions", request).json()
    assert whole["object"] == "chat.completion"
    stream = post(client, "/v1/chat/completions", {**request, "stream": True, "stream_options": {"include_usage": True}})
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_load_and_unload_adapters_at_run_time(client, root, tmp_path):
    shutil.copytree(root / "a", root / "d")
    assert "outside the adapter roots" in error_of(post(client, "/v1/adapters", {"name": "d2", "path": str(tmp_path)}),
                                                   403)
    assert "invalid adapter name" in error_of(post(client, "/v1/adapters", {"name": "../a"}), 403)
    assert post(client, "/v1/adapters", {"name": "d"}).json() == {"id": "d", "object": "model", "created": 0,
                                                                  "owned_by": "peftlab-adapter", "resident": True}
    assert "taken" in error_of(post(client, "/v1/adapters", {"name": "d"}), 409)
    assert "d" in [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    request = {"model": "d", "prompt": "w1 w2", "max_tokens": 4, "temperature": 0}
    as_a = post(client, "/v1/completions", {**request, "model": "a"}).json()["choices"][0]["text"]
    assert post(client, "/v1/completions", request).json()["choices"][0]["text"] == as_a
    assert client.delete("/v1/adapters/d", headers=AUTH).json() == {"id": "d", "object": "model", "deleted": True}
    error_of(post(client, "/v1/completions", request), 404)
    error_of(client.delete("/v1/adapters/d", headers=AUTH), 404)


def test_an_adapter_that_does_not_fit_is_refused_and_forgotten(client, root):
    get_peft_model(tiny("gpt2"), LoraConfig(target_modules=["c_attn"]), "g").save_pretrained(root, ["g"])
    assert "does not fit the base model" in error_of(post(client, "/v1/adapters", {"name": "g"}), 422)
    assert "g" not in [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]


def test_a_request_that_fails_is_a_500_and_the_next_one_is_served(client, engine):
    forward = engine.store.forward

    def flaky(adapters, **inputs):
        if "c" in adapters:
            raise RuntimeError("kernel exploded")
        return forward(adapters, **inputs)

    engine.store.forward = flaky
    assert "kernel exploded" in error_of(post(client, "/v1/completions", {"model": "c", "prompt": "w1"}), 500)
    assert post(client, "/v1/completions", {"model": "a", "prompt": "w1"}).status_code == 200


def test_a_stream_that_fails_midway_ends_with_an_error_event(client, engine):
    forward = engine.store.forward

    def flaky(adapters, **inputs):  # the prefill works, the first decode step raises
        if "c" in adapters and inputs["input_ids"].shape[1] == 1:
            raise RuntimeError("kernel exploded")
        return forward(adapters, **inputs)

    engine.store.forward = flaky
    stream = post(client, "/v1/completions", {"model": "c", "prompt": "w1", "stream": True, "ignore_eos": True})
    events = [line[len("data: "):] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert stream.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "kernel exploded"


def test_a_full_queue_is_429(root, tokenizer):
    engine = make_engine(root, tokenizer, queue_size=1)  # not started: the queue never drains
    engine.submit([5, 6], "a", SamplingParams(max_tokens=2), lambda event: None)
    with TestClient(create_app(engine)) as client:
        assert "already waiting" in error_of(post(client, "/v1/completions", {"model": "a", "prompt": "w1"}, {}), 429)
    engine.stop()



def test_prompt_prefix_and_llama_adapters_share_a_batch_and_equal_generate_alone(family_root, family_reference,
                                                                                  tokenizer):
    names = ["a", "base"] + [name for adapters in FAMILIES.values() for name in adapters]
    jobs = [(name, " ".join(f"w{10 + i + j}" for j in range(1 + i % 4))) for i, name in enumerate(names)]
    engine = make_engine(family_root, tokenizer).start()
    forward, calls = engine.store.forward, []
    engine.store.forward = lambda adapters, **inputs: (calls.append(set(adapters)), forward(adapters, **inputs))[1]

    def all_waiting():  # on the engine thread: hold it until every request is queued, so one batch takes them
        for _ in range(3000):
            if engine.stats["waiting"] == len(jobs):
                return
            time.sleep(0.01)

    try:
        with TestClient(create_app(engine, api_key=KEY), raise_server_exceptions=False) as client:
            def ask(job):
                name, text = job
                body = {"model": name, "prompt": text, "max_tokens": 8, "temperature": 0, "stream": name == "prompt2"}
                response = post(client, "/v1/completions", body)
                assert response.status_code == 200, response.text
                if not body["stream"]:
                    return response.json()["choices"][0]["text"]
                events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
                return "".join(c["choices"][0]["text"] for c in map(json.loads, events[:-1]) if c["choices"])

            engine.call(all_waiting)
            with ThreadPoolExecutor(len(jobs)) as pool:
                texts = list(pool.map(ask, jobs))
    finally:
        engine.stop()
    for (name, text), got in zip(jobs, texts):
        assert got == greedy_reply(family_reference, tokenizer, engine, tokenizer(text)["input_ids"], name, 8), name
    assert set(names) - {"base"} <= set().union(*calls) and max(len(c) for c in calls) == len(names)
