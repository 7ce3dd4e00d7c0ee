"""``peftlab serve`` pieces: the typer command's flags and building a server from a model directory."""

import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from peftlab.serve.cli import _is_loopback, serve
from peftlab.serve.server import build

from .conftest import base_model


def test_the_command_offers_the_documented_flags():
    app = typer.Typer()
    app.command()(serve)
    app.command("other")(lambda: None)  # two commands, so `serve` is addressed by name as in peftlab
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in ("--adapters", "--host", "--port", "--api-key", "--max-resident", "--max-batch", "--queue-size",
                 "--config"):
        assert flag in result.output
    assert "127.0.0.1" in result.output


def test_loopback_hosts():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("example.com")


def test_build_serves_a_model_directory_and_its_adapters(tmp_path, adapter_root, tokenizer):
    base_model().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    app, engine = build(str(tmp_path / "model"), [str(adapter_root / "a"), f"sql={adapter_root / 'c'}"],
                        max_resident=1, device="cpu")
    assert engine.store.names() == ["a", "sql"] and engine.store.max_resident == 1
    engine.start()
    try:
        with TestClient(app) as client:
            reply = client.post("/v1/chat/completions", json={"model": "sql", "max_tokens": 3, "temperature": 0,
                                                               "messages": [{"role": "user", "content": "w5"}]})
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
    finally:
        engine.stop()
