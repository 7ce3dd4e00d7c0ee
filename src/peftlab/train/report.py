"""What a run leaves for people to read: ``metrics.jsonl``, ``loss.png`` and a model card ``README.md``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, get_method
from ..formats import atomic_write, hf_peft

if TYPE_CHECKING:
    from .args import TrainArgs
    from .loop import TrainResult


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, one line per log or eval event.

    Every event has ``"event"`` (``"train"`` or ``"eval"``) and ``"step"``; lines are appended as
    they happen, so the file is readable while training runs.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, event: dict[str, Any]) -> None:
        # One write per line: a killed process leaves at most a torn last line (dropped on resume).
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop the events after ``step``: a run resumed from checkpoint ``step`` writes them again,
        so the file reads as one uninterrupted run. ``keep_until(0)`` starts an empty file."""
        kept = "".join(json.dumps(e) + "\n" for e in read_metrics(self.path) if e["step"] <= step)
        atomic_write(self.path, lambda p: p.write_text(kept))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of a ``metrics.jsonl`` (none if it does not exist), skipping a torn line."""
    path = Path(path)
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a process killed mid-write
    return events


def plot_losses(losses: list[float], path: str | os.PathLike, *, evals: list[tuple[int, float]] = (),
                title: str = "training loss") -> None:
    """Write a PNG of the loss per step (and eval_loss at the steps it was measured), atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, label="train loss")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def write_model_card(path: str | os.PathLike, *, model, adapters: list[str], args: "TrainArgs",
                     result: "TrainResult", parameters: tuple[int, int], data_summary: str | None = None,
                     command: str | None = None) -> None:
    """Write the model card ``README.md``: base model, method and config, data, parameter counts,
    final and best metrics, the training arguments, and how to load the adapter."""
    base = getattr(model.base_model.config, "_name_or_path", "") or ""
    methods = sorted({model.peft_config[a].method for a in adapters})
    trainable, total = parameters
    stop = (f"stopped early at step {result.final_step} (eval_loss did not improve for "
            f"{args.early_stopping_patience} evaluations)" if result.stopped_early else f"{result.final_step} steps")
    lines = [
        "---", "library_name: peftlab", *([f"base_model: {base}"] if base else []),
        f"tags: [peftlab, {', '.join(methods)}]", "---", "",
        f"# {', '.join(methods)} adapter for {base or type(model.base_model).__name__}", "",
        f"Trained with peftlab: {stop}, {result.tokens:,d} tokens in {result.seconds:.0f} s.", "",
        "## Parameters", "", "| | count |", "|---|---:|",
        f"| trainable | {trainable:,d} |", f"| total | {total:,d} |",
        f"| trainable share | {100 * trainable / max(total, 1):.4f} % |", "",
        "## Method", "",
    ]
    for name in adapters:
        lines += [f"Adapter `{name}` ({model.peft_config[name].method}):", "", "```json",
                  model.peft_config[name].to_json(), "```", ""]
    lines += ["## Data", "", data_summary or "Not described.", "", "## Metrics", "", *_metrics_table(result), "",
              "![loss curve](loss.png)", "", "## Training arguments", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| argument | value |", "|---|---|", *(f"| {k} | `{v}` |" for k, v in args.to_dict().items()), ""]
    lines += _usage(model, adapters[0], base)
    atomic_write(Path(path), lambda p: p.write_text("\n".join(lines) + "\n"))


def _metrics_table(result: "TrainResult") -> list[str]:
    """Final metrics (last training loss, last evaluation) and, when eval_loss was measured, the
    evaluation with the lowest."""
    final = {"loss": result.losses[-1]} if result.losses else {}
    final.update({k: v for k, v in (result.last_eval or {}).items() if k != "step"})
    if result.best_eval is None:
        return [f"| metric | final (step {result.final_step}) |", "|---|---:|",
                *(f"| {k} | {_fmt(v)} |" for k, v in final.items())]
    best = {k: v for k, v in result.best_eval.items() if k != "step"}
    rows = [f"| metric | final (step {result.final_step}) | best eval (step {result.best_eval['step']}) |",
            "|---|---:|---:|"]
    for key in dict.fromkeys([*final, *best]):
        rows.append(f"| {key} | {_fmt(final.get(key))} | {_fmt(best.get(key))} |")
    return rows


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _usage(model, name: str, base: str) -> list[str]:
    """Loading instructions: with peftlab always; with Hugging Face PEFT when it can express the config."""
    cls = type(model.base_model).__name__
    base_id = base or "<the base model you trained on>"
    folder = "adapter" if name == "default" else f"adapter/{name}"
    lines = [
        "## Usage", "", "With peftlab:", "", "```python", f"from transformers import {cls}",
        "from peftlab import PeftModel", "", f'base = {cls}.from_pretrained("{base_id}")',
        f'model = PeftModel.from_pretrained(base, "{folder}")', "```", "",
    ]
    if get_method(model.peft_config[name].method).hf is None:
        return lines + [f"Hugging Face PEFT has no {model.peft_config[name].method} method; load it with peftlab.", ""]
    try:
        hf_peft.config_to_hf(model, name)
    except ConfigError as exc:
        return lines + [f"Hugging Face PEFT cannot express this config: {exc}", ""]
    return lines + [
        "With Hugging Face PEFT (peftlab writes its own config; write PEFT's once, the weights are the same):",
        "", "```python", "import peft", "",
        f'PeftModel.from_pretrained(base, "{folder}").save_pretrained("adapter-peft", format="peft")',
        f'model = peft.PeftModel.from_pretrained({cls}.from_pretrained("{base_id}"), "adapter-peft")', "```", "",
    ]
