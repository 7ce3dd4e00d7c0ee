"""The ``peftlab`` command line, generated from typed function signatures (typer)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Parameter-efficient fine-tuning of transformers models.")


@app.callback()
def main() -> None:
    """peftlab: train small adapters on frozen pretrained models."""


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Where the adapter and the loss curve go."),
    steps: int = typer.Option(0, help="Training steps (0 = the validated default)."),
    seed: int = typer.Option(0, help="Seed for the task split, the adapter init and the batches."),
    threads: int = typer.Option(2, help="CPU threads."),
) -> None:
    """Teach SmolLM2-135M-Instruct an invented task with LoRA, offline, in a few minutes."""
    from .demo import run_demo

    if steps < 0:
        raise typer.BadParameter(f"--steps must be >= 0, got {steps}")
    if not run_demo(out, steps=steps or None, seed=seed, threads=threads):
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()
