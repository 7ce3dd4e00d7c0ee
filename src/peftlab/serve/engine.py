"""Continuous batching: requests for different adapters decode together, one forward per step.

One background thread owns the model. Requests wait in a bounded queue (:class:`QueueFull` beyond
``queue_size``). Each iteration of the engine (:meth:`Engine.step`):

1. runs the commands other threads queued for the model (:meth:`Engine.call`: load/unload);
2. **admits** waiting requests while the batch has room and their adapter can be made resident
   (:meth:`AdapterStore.acquire`), and **prefills** them: one forward over their left-padded
   prompts, each row routed to its own adapter, into a fresh KV cache that is then concatenated
   onto the running batch's cache (:mod:`peftlab.serve.kv`). Their first token comes from that
   forward. Virtual tokens of prompt-type adapters are prepended here, once, and stay in the
   cache as part of their row; prefix keys/values (prefix tuning, LLaMA-Adapter) are added inside
   attention at every step, per row, by the route (:mod:`peftlab.attention`);
3. **decodes** one token for every running row with ONE forward: input (B, 1), each row's
   ``position_ids`` its own length, the attention mask hiding each row's left padding, one
   adapter per row (the mixed-batch path of the adapter layers and of the attention hook);
4. sends each row's new text, and drops finished rows (end-of-text token, stop string,
   ``max_tokens``, cancelled), trimming padding no remaining row needs.

Failures stay with their request: a request whose adapter does not load fails at admission; a
prefill that raises is retried one request at a time; a decode step that raises is undone (the
cache is restored from its snapshot) and each row is probed alone, and only rows that fail alone
fail. A failure no single row reproduces (out of memory, say) fails that step's rows; the engine
itself keeps running.

Results reach the caller through the ``sink`` given to :meth:`Engine.submit`, called on the engine
thread with each :class:`Chunk` (the last one has ``finish_reason``) or with the exception that
ended the request.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from ..generation import stop_ids
from . import kv
from .sampling import SamplingParams, sample
from .store import BASE_ID, AdapterBusy, AdapterStore
from .text import TextStream

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is full (HTTP 429): retry later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down; the request was not (or not fully) served."""


@dataclass(frozen=True)
class Chunk:
    """A piece of one request's completion; the last one carries ``finish_reason``."""

    text: str
    finish_reason: str | None = None
    """None while generating; then "stop" (end-of-text token or stop string) or "length"."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens generated so far, the end-of-text token included."""


@dataclass(frozen=True)
class Completion:
    """A whole completion, as :meth:`Engine.generate` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Sink = Callable[[Any], None]


@dataclass(eq=False)
class Request:
    """One request, from submission to its last chunk. :meth:`cancel` drops it at the next step."""

    id: int
    adapter: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    stream: TextStream
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # columns of the batch cache that are this row's (prompt + tokens fed so far)
    generator: torch.Generator | None = None
    held: bool = False  # holds its adapter in the store
    done: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """The continuous-batching loop over one :class:`AdapterStore`'s model (module docstring).

    Args:
        store: the adapters, and the model (``store.model``) this engine alone runs.
        tokenizer: the model's tokenizer (decodes the stream; its end-of-text token stops rows).
        max_batch: most requests decoding at once.
        queue_size: most requests waiting for a place in the batch; more raise :class:`QueueFull`.
        max_context: prompt + completion tokens per request; default the model's
            ``max_position_embeddings``.
    """

    def __init__(self, store: AdapterStore, tokenizer, *, max_batch: int = 16, queue_size: int = 64,
                 max_context: int | None = None) -> None:
        if max_batch < 1 or queue_size < 1:
            raise ValueError(f"max_batch and queue_size must be >= 1, got {max_batch}, {queue_size}")
        self.store, self.tokenizer = store, tokenizer
        self.max_batch, self.queue_size = max_batch, queue_size
        config = store.model.config
        self.max_context = max_context or getattr(config, "max_position_embeddings", None) or 2048
        self.stop_ids = set(stop_ids(store.model, tokenizer))
        self.vocab_size = store.model.get_input_embeddings().num_embeddings
        self.device = next(store.model.parameters()).device
        self._ids = itertools.count(1)
        self._waiting: deque[Request] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._rows: list[Request] = []  # the running batch, in cache row order
        self._cache: DynamicCache | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- any thread ------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], adapter: str, params: SamplingParams, sink: Sink) -> Request:
        """Queue one request for ``adapter`` (an adapter name or ``"base"``).

        Raises (before anything is queued): :class:`~peftlab.serve.store.AdapterNotFound`,
        :class:`QueueFull`, :class:`EngineStopped`, or ``ValueError`` for a prompt that is empty,
        holds ids outside the vocabulary, or does not leave room for ``params.max_tokens``.
        """
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens; give some text")
        outside = [i for i in prompt_ids if not 0 <= i < self.vocab_size]
        if outside:
            raise ValueError(f"token id(s) {outside[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}, but the "
                             f"model's context is {self.max_context} tokens; shorten the prompt or lower max_tokens "
                             f"to at most {self.max_context - len(prompt_ids)}")
        if adapter != BASE_ID:
            self.store.require(adapter)
        request = Request(next(self._ids), adapter, prompt_ids, params, sink, TextStream(self.tokenizer, params.stop))
        with self._wake:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--queue-size {self.queue_size}); "
                                f"retry shortly")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def generate(self, prompt_ids: Sequence[int], adapter: str = BASE_ID, params: SamplingParams = SamplingParams(),
                 timeout: float | None = None) -> Completion:
        """Submit and wait for the whole completion (the engine must be running, or be stepped by
        another thread). Raises the request's exception if it failed."""
        finished = threading.Event()
        chunks: list[Any] = []

        def sink(event: Any) -> None:
            chunks.append(event)
            if isinstance(event, BaseException) or event.finish_reason:
                finished.set()

        request = self.submit(prompt_ids, adapter, params, sink)
        if not finished.wait(timeout):
            request.cancel()
            raise TimeoutError(f"request {request.id} did not finish within {timeout} s")
        return _completion(chunks, request)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps (the only thread that may change the
        model); inline when the engine thread is not running."""
        future: Future = Future()
        with self._wake:
            if self._thread is not None and not self._stopping:
                self._commands.append((fn, future))
                self._wake.notify()
                return future
        _run_into(fn, future)
        return future

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftlab-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; waiting and running requests fail with :class:`EngineStopped`."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        stopped = EngineStopped("the server is shutting down")
        for request in list(self._waiting) + self._rows:
            self._fail(request, stopped)
        self._waiting.clear()
        self._drop_finished()
        for fn, future in self._commands:
            future.set_exception(stopped)
        self._commands.clear()

    @property
    def stats(self) -> dict[str, int]:
        return {"running": len(self._rows), "waiting": len(self._waiting)}

    # -- engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._commands or self._rows):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug in the loop itself: start over with an empty batch, keep serving
                logger.exception("engine step failed; failing the running requests")
                for request in self._rows:
                    self._fail(request, RuntimeError("internal error in the serving engine (see the server log)"))
                    self._release(request)
                self._rows, self._cache = [], None

    def step(self) -> None:
        """One iteration: commands, admission + prefill, one decode step (module docstring)."""
        with torch.no_grad():
            while self._commands:
                _run_into(*self._commands.popleft())
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            if self._rows:
                self._decode()

    def _admit(self) -> list[Request]:
        admitted = []
        with self._wake:
            waiting = list(self._waiting)
        for request in waiting:
            if len(self._rows) + len(admitted) >= self.max_batch:
                break
            if not request.cancelled and request.adapter != BASE_ID:
                try:
                    self.store.acquire(request.adapter)
                    request.held = True
                except AdapterBusy:
                    continue  # stays in the queue until a running request frees an adapter
                except Exception as exc:
                    self._fail(request, exc)
            with self._wake:
                self._waiting.remove(request)
            if request.done or request.cancelled:
                self._release(request)
            else:
                admitted.append(request)
        return admitted

    def _prefill(self, group: list[Request]) -> None:
        width = max(len(r.prompt_ids) for r in group)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in group], device=self.device)
        mask = kv.attention_mask([len(r.prompt_ids) for r in group], width, self.device)
        adapters = [r.adapter for r in group]
        try:
            # Rows with prompt-type adapters get their virtual tokens in front (they join the
            # cache); the mask and positions then come with them. Prefix keys/values are added
            # inside attention at every step and never enter the cache.
            inputs = self.store.with_virtual_tokens(adapters, input_ids=ids, attention_mask=mask)
            inputs.setdefault("position_ids", (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0))
            out = self.store.forward(adapters, **inputs, past_key_values=DynamicCache(), use_cache=True,
                                     logits_to_keep=1)
            cache, lengths = kv.right_align(out.past_key_values, inputs["attention_mask"])
        except Exception as exc:
            if len(group) == 1:
                self._fail(group[0], exc)
                self._drop(group)
                return
            for request in group:  # find the request that fails alone
                self._prefill([request])
            return
        for request, length in zip(group, lengths):
            request.length = length  # the prompt's tokens, and its adapter's virtual tokens
            seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._cache = cache if self._cache is None else kv.concat(self._cache, cache)
        self._rows += group
        self._next_tokens(group, out.logits[:, -1])
        self._drop_finished()

    def _decode(self) -> None:
        rows, snapshot = self._rows, kv.layers(self._cache)
        width = self._cache.get_seq_length() + 1
        try:
            out = self._forward_step(rows, self._cache, width)
        except Exception as exc:
            self._cache = kv.from_layers(snapshot)  # layers that ran before the failure grew
            self._isolate(snapshot, exc)
            self._drop_finished()
            return
        for request in rows:
            request.length += 1
        self._next_tokens(rows, out.logits[:, -1])
        self._drop_finished()

    def _forward_step(self, rows: list[Request], cache: DynamicCache, width: int) -> Any:
        """One new token for each row: ids (B, 1) at position ``length``, mask (B, width)."""
        return self.store.forward(
            [r.adapter for r in rows],
            input_ids=torch.tensor([[r.tokens[-1]] for r in rows], device=self.device),
            attention_mask=kv.attention_mask([r.length + 1 for r in rows], width, self.device),
            position_ids=torch.tensor([[r.length] for r in rows], device=self.device),
            past_key_values=cache, use_cache=True,
        )

    def _isolate(self, snapshot: kv.Layers, exc: Exception) -> None:
        """After a failed decode step: fail the rows that fail alone, or all if none does."""
        failed = 0
        for i, request in enumerate(self._rows):
            try:
                self._forward_step([request], kv.select(snapshot, [i], request.length), request.length + 1)
            except Exception as own:
                self._fail(request, own)
                failed += 1
        if not failed:
            logger.error("decode step failed for the whole batch: %s", exc)
            for request in self._rows:
                self._fail(request, exc)

    def _next_tokens(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Pick each row's next token from ``logits`` (B, V) and send the text it completes."""
        greedy = logits.argmax(-1).tolist()
        for i, request in enumerate(rows):
            if request.done:
                continue
            try:
                token = greedy[i] if request.params.temperature == 0 else sample(logits[i], request.params,
                                                                                 request.generator)
                self._advance(request, token)
            except Exception as exc:
                self._fail(request, exc)

    def _advance(self, request: Request, token: int) -> None:
        request.tokens.append(token)
        params = request.params
        if token in self.stop_ids and not params.ignore_eos:
            self._finish(request, request.stream.flush(), "stop")
            return
        text, stopped = request.stream.push(token)
        if stopped:
            self._finish(request, text, "stop")
        elif len(request.tokens) >= params.max_tokens:
            self._finish(request, text + request.stream.flush(), "length")
        elif text:
            self._send(request, Chunk(text, None, len(request.prompt_ids), len(request.tokens)))

    def _finish(self, request: Request, text: str, reason: str) -> None:
        request.done = True
        self._send(request, Chunk(text, reason, len(request.prompt_ids), len(request.tokens)))

    def _fail(self, request: Request, exc: BaseException) -> None:
        if not request.done:
            request.done = True
            self._send(request, exc)

    def _send(self, request: Request, event: Any) -> None:
        try:
            request.sink(event)
        except Exception:  # the client went away: stop spending steps on it
            logger.warning("request %d: delivering its result failed; dropping it", request.id, exc_info=True)
            request.cancelled = True

    def _release(self, request: Request) -> None:
        if request.held:
            request.held = False
            self.store.release(request.adapter)

    def _drop(self, requests: list[Request]) -> None:
        for request in requests:
            self._release(request)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not (r.done or r.cancelled)]
        if len(keep) == len(self._rows):
            return
        self._drop([r for r in self._rows if r.done or r.cancelled])
        rows = [self._rows[i] for i in keep]
        width = max((r.length for r in rows), default=0)
        self._cache = kv.select(kv.layers(self._cache), keep, width) if rows else None
        self._rows = rows


def _run_into(fn: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)


def _completion(events: list[Any], request: Request) -> Completion:
    if isinstance(events[-1], BaseException):
        raise events[-1]
    last = events[-1]
    return Completion("".join(e.text for e in events), list(request.tokens), last.finish_reason,
                      last.prompt_tokens, last.completion_tokens)
