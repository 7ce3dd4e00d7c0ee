"""The HTTP API: OpenAI-compatible completions and chat completions over many adapters.

``model`` in a request picks ``"base"`` (the plain base model) or a loaded adapter, per request;
requests for different adapters share decode steps in the :class:`~peftlab.serve.engine.Engine`.

Routes: ``GET /v1/models``; ``POST /v1/completions``; ``POST /v1/chat/completions`` (both stream
with ``"stream": true``, as server-sent events in OpenAI's chunk format, ending ``data: [DONE]``);
``POST /v1/adapters`` ``{"name", "path"?}`` and ``DELETE /v1/adapters/{name}`` to load and unload
at run time; ``GET /health`` (never needs the key).

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 401 missing or
wrong API key, 403 adapter path outside the adapter roots, 404 unknown model, 409 name taken, 422
malformed body (the message names the field), 429 queue full, 400 a prompt the model cannot take,
500 a request that failed while generating (it fails alone), 503 shutting down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..config import ConfigError
from ..formats import AdapterLoadError
from ..generation import encode_prompt
from . import schema
from .engine import Chunk, Engine, EngineStopped, QueueFull
from .sampling import SamplingParams
from .store import BASE_ID, AdapterExists, AdapterNotFound, AdapterPathError

# Exception -> (HTTP status, OpenAI error type). Starlette picks the nearest class in the MRO, so
# the ValueError subclasses above keep their own status.
_ERRORS: dict[type[BaseException], tuple[int, str]] = {
    AdapterNotFound: (404, "not_found_error"),
    FileNotFoundError: (404, "not_found_error"),
    AdapterPathError: (403, "permission_error"),
    AdapterExists: (409, "conflict_error"),
    AdapterLoadError: (422, "invalid_request_error"),
    ConfigError: (422, "invalid_request_error"),
    QueueFull: (429, "rate_limit_error"),
    ValueError: (400, "invalid_request_error"),
    EngineStopped: (503, "server_error"),
    Exception: (500, "server_error"),
}


def create_app(engine: Engine, *, api_key: str | None = None, max_tokens: int = 256) -> FastAPI:
    """The FastAPI app over a started (or stepped) ``engine``.

    ``api_key``: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>``.
    ``max_tokens``: the reply limit of chat requests that give none (completions default to 16,
    as in OpenAI's API).
    """
    app = FastAPI(title="peftlab serve", summary="OpenAI-compatible completions over many adapters")
    store, tokenizer = engine.store, engine.tokenizer
    for exc_type, (status, kind) in _ERRORS.items():
        app.add_exception_handler(exc_type, _handler(status, kind))
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    async def authorize(authorization: str | None = Header(None)) -> None:
        if api_key is not None and not hmac.compare_digest(authorization or "", f"Bearer {api_key}"):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [schema.model_card(BASE_ID, "peftlab")]
                + [schema.model_card(name, "peftlab-adapter") for name in store.names()]}

    @v1.post("/completions")
    async def completions(body: schema.CompletionRequest) -> Any:
        prompts = [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in body.prompts()]
        params = body.sampling(body.max_tokens or 16)
        results = _Results(engine, [(ids, body.model, params) for ids in prompts])
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_completion_events(results, request_id, body), results)
        texts, last = await results.collect()
        return schema.completion(request_id, body.model, texts, last)

    @v1.post("/chat/completions")
    async def chat_completions(body: schema.ChatRequest) -> Any:
        ids = encode_prompt(tokenizer, [m.as_template_input() for m in body.messages])
        limit = body.max_completion_tokens or body.max_tokens or min(max_tokens, engine.max_context - len(ids))
        results = _Results(engine, [(ids, body.model, body.sampling(max(limit, 1)))])
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_chat_events(results, request_id, body), results)
        texts, last = await results.collect()
        return schema.chat_completion(request_id, body.model, texts[0], last[0])

    @v1.post("/adapters", status_code=201)
    async def load_adapter(body: schema.AdapterRequest) -> dict[str, Any]:
        await run_in_threadpool(store.register, body.name, body.path)  # reads the files: off the event loop
        try:
            resident = await asyncio.wrap_future(engine.call(lambda: store.preload(body.name)))
        except Exception:  # does not fit the model: forget it again
            await asyncio.wrap_future(engine.call(lambda: store.unregister(body.name)))
            raise
        return {**schema.model_card(body.name, "peftlab-adapter"), "resident": resident}

    @v1.delete("/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        await asyncio.wrap_future(engine.call(lambda: store.unregister(name)))
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.stats, "resident": store.resident}

    app.include_router(v1)
    return app


class _Results:
    """Chunks of one or more engine requests (one per choice), delivered on the event loop."""

    def __init__(self, engine: Engine, jobs: list[tuple[list[int], str, SamplingParams]]) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = []
        try:
            for index, (ids, model, params) in enumerate(jobs):
                # The engine thread calls the sink; hand each event over to this request's loop.
                def sink(event: Any, index: int = index) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

                self.requests.append(engine.submit(ids, model, params, sink))
        except BaseException:
            self.cancel()
            raise

    async def events(self) -> AsyncIterator[tuple[int, Chunk]]:
        """(choice index, chunk) until every choice has finished; a failed one raises its error."""
        running = len(self.requests)
        while running:
            index, event = await self.queue.get()
            if isinstance(event, BaseException):
                raise event
            running -= event.finish_reason is not None
            yield index, event

    async def collect(self) -> tuple[list[str], list[Chunk]]:
        """The whole text and the last chunk of each choice."""
        texts, last = [""] * len(self.requests), [None] * len(self.requests)
        try:
            async for index, chunk in self.events():
                texts[index] += chunk.text
                last[index] = chunk
        finally:
            self.cancel()  # no-op for finished requests; stops the others if one failed
        return texts, last

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()


async def _completion_events(results: _Results, request_id: str, body: schema.CompletionRequest) -> AsyncIterator[dict]:
    last = []
    async for index, chunk in results.events():
        yield schema.completion_chunk(request_id, body.model, index, chunk.text, chunk.finish_reason)
        if chunk.finish_reason:
            last.append(chunk)
    if body.include_usage:
        yield schema.usage_chunk(request_id, body.model, "text_completion", last)


async def _chat_events(results: _Results, request_id: str, body: schema.ChatRequest) -> AsyncIterator[dict]:
    yield schema.chat_chunk(request_id, body.model, {"role": "assistant", "content": ""}, None)
    async for _, chunk in results.events():
        if chunk.text:
            yield schema.chat_chunk(request_id, body.model, {"content": chunk.text}, None)
        if chunk.finish_reason:
            yield schema.chat_chunk(request_id, body.model, {}, chunk.finish_reason)
            if body.include_usage:
                yield schema.usage_chunk(request_id, body.model, "chat.completion.chunk", [chunk])


def _sse(events: AsyncIterator[dict], results: _Results) -> StreamingResponse:
    """Server-sent events; an error after the stream began is sent as an ``error`` event (the
    status line is already out). A client that goes away cancels its requests."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as exc:
            status, kind = _status_of(exc)
            yield f"data: {json.dumps(schema.error(_message(exc), kind, status))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (GeneratorExit / cancellation)
            results.cancel()

    return StreamingResponse(body(), media_type="text/event-stream")


def _status_of(exc: BaseException) -> tuple[int, str]:
    for klass in type(exc).__mro__:
        if klass in _ERRORS:
            return _ERRORS[klass]
    return _ERRORS[Exception]


def _message(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _handler(status: int, kind: str):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(schema.error(_message(exc), kind, status), status_code=status)

    return handle


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
    return JSONResponse(schema.error(str(exc.detail), kind, exc.status_code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 whose message says which field is wrong and why, e.g. ``max_tokens: Input should be
    greater than or equal to 1``."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"] if part != "body")
        problems.append(f"{where}: {err['msg']}" if where else err["msg"])
    first = exc.errors()[0]["loc"] if exc.errors() else ()
    param = ".".join(str(p) for p in first if p != "body") or None
    return JSONResponse(schema.error("; ".join(problems), "invalid_request_error", 422, param), status_code=422)
