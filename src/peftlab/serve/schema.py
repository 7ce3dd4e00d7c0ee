"""The OpenAI-compatible request bodies (pydantic: a bad body is a 422 naming the field) and the
response objects, in the shapes OpenAI's API documents and its Python client parses.

Fields a request may carry are listed here; any other field is refused (422) rather than ignored,
so a client asking for ``logprobs`` or ``n=2`` learns that it is not supported. ``ignore_eos`` is
an extension (as in vLLM), for load tests that need every completion to run to ``max_tokens``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine import Chunk
from .sampling import SamplingParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    """Send one more chunk, before ``[DONE]``, with the token counts and no choices."""


class _Generation(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description='"base" or the name of a loaded adapter (GET /v1/models).')
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported; send {n} requests (with different seeds) instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > 4 or any(not s for s in strings):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stop

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=stop,
                              seed=self.seed, ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    """POST /v1/completions. ``prompt``: a string, a list of token ids, or a list of strings (one
    choice per string). ``max_tokens`` defaults to 16, as in OpenAI's API."""

    prompt: str | list[int] | list[str]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a string to tokenise, or token ids."""
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str):
            return list(self.prompt)
        return [self.prompt]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """``{"role", "content"}`` for the tokenizer's chat template (OpenAI's "developer" role is
        the system role of older templates)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Generation):
    """POST /v1/chat/completions. ``max_completion_tokens`` (OpenAI's newer name) wins over
    ``max_tokens``; with neither, the reply may run to the server's default limit."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterRequest(BaseModel):
    """POST /v1/adapters: load an adapter directory under ``name``. ``path`` (absolute, or relative
    to an adapter root) defaults to ``<root>/<name>``; it must lie inside a root."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str | None = None


# -- responses ---------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, texts: list[str], last: list[Chunk]) -> dict[str, Any]:
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": c.finish_reason}
                    for i, (text, c) in enumerate(zip(texts, last))],
        "usage": usage(sum(c.prompt_tokens for c in last), sum(c.completion_tokens for c in last)),
    }


def completion_chunk(request_id: str, model: str, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_completion(request_id: str, model: str, text: str, last: Chunk) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": last.finish_reason}],
        "usage": usage(last.prompt_tokens, last.completion_tokens),
    }


def chat_chunk(request_id: str, model: str, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, model: str, obj: str, last: list[Chunk]) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the token counts."""
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(sum(c.prompt_tokens for c in last), sum(c.completion_tokens for c in last))}


def model_card(model_id: str, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owned_by}


def error(message: str, kind: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body; its client raises the exception class of ``status``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
