"""Building and running the server: model + adapter store + engine + app, under uvicorn.

:func:`build` is what ``peftlab serve`` runs; :func:`background` runs an app in a thread of the
current process (tests, benchmarks, notebooks) and yields its base URL.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import uvicorn
from fastapi import FastAPI

from ..models import load
from .app import create_app
from .engine import Engine
from .store import AdapterStore

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(base: str, adapter_dirs: Sequence[str | os.PathLike], *, api_key: str | None = None, max_resident: int = 8,
          max_batch: int = 16, queue_size: int = 64, max_tokens: int = 256, device: str = "auto",
          dtype: str = "float32") -> tuple[FastAPI, Engine]:
    """Load ``base`` (alias, directory or hub id) on ``device`` ("auto": CUDA when available) in
    ``dtype``, register the adapters of ``adapter_dirs`` (each an adapter directory, a folder of
    them, or ``NAME=DIR`` for an adapter directory served as NAME), and return the app and its
    engine (not started)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load(base, dtype=_DTYPES[dtype])
    roots, named = [], {}
    for entry in map(str, adapter_dirs):
        name, is_named, directory = entry.partition("=")
        if is_named and os.sep not in name:  # "sql=runs/sql/adapter"; a path may hold "=" further on
            named[name] = directory
        else:
            roots.append(entry)
    store = AdapterStore(model.to(device).eval(), roots, named=named, max_resident=max_resident)
    engine = Engine(store, tokenizer, max_batch=max_batch, queue_size=queue_size)
    return create_app(engine, api_key=api_key, max_tokens=max_tokens), engine


@contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a thread until the block ends; yields ``http://host:port`` (port 0: a
    free one, taken by binding the socket here, so there is no race for it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="peftlab-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the background server did not start (see the log above)")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
