"""``peftlab serve``: the typer command (registered by ``peftlab.cli``)."""

from __future__ import annotations

import ipaddress
from typing import Optional

import typer

from ..cli_options import ConfigFile


def serve(
    base: str = typer.Argument(..., help="Base model: an alias (smollm2), a local model directory or a Hub id."),
    adapters: list[str] = typer.Option(
        [], "--adapters", help="An adapter directory (served under its folder name), a folder of them, or "
                               "NAME=DIR to serve DIR as NAME; repeat for more. POST /v1/adapters loads only "
                               "from under these."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default serves this machine only."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to bind."),
    api_key: Optional[str] = typer.Option(None, envvar="PEFTLAB_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    max_resident: int = typer.Option(8, min=1, help="Adapters attached to the model at once (least recently "
                                                    "used ones are evicted; their CPU copy stays)."),
    max_batch: int = typer.Option(16, min=1, help="Requests decoding together in one batch."),
    queue_size: int = typer.Option(64, min=1, help="Requests waiting for a place; beyond it: HTTP 429."),
    max_tokens: int = typer.Option(256, min=1, help="Reply limit of chat requests that give none."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    config: ConfigFile = None,
) -> None:
    """Serve the base model and many adapters over an OpenAI-compatible HTTP API."""
    import uvicorn

    from .server import build

    if api_key is None and not _is_loopback(host):
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    app, engine = build(base, adapters, api_key=api_key, max_resident=max_resident, max_batch=max_batch,
                        queue_size=queue_size, max_tokens=max_tokens, device=device, dtype=dtype)
    names = engine.store.names()
    typer.echo(f"serving {base} with {len(names)} adapter(s): {', '.join(names) or '(none yet)'} "
               f"on http://{host}:{port}/v1", err=True)
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.stop()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
