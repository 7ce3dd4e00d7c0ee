"""Checkpoints: everything needed to continue a run exactly where it stopped.

One checkpoint is one directory, ``<output_dir>/checkpoints/step-000040/``::

    adapter/                  each trained adapter as save_pretrained writes it: loadable on its own
    trainable.safetensors     the trained tensors themselves, keyed "<adapter>/<module path>.<tensor>"
    optimizer.safetensors     AdamW's running averages, keyed "<param index>.exp_avg" / ".exp_avg_sq"
    trainer_state.json        step, the loop's progress, the optimizer index and the RNG states

``trainable.safetensors`` is not redundant with ``adapter/``: some methods save a different form
than they train (prefix tuning trains an MLP but saves only its output), and resuming needs the
trained one. Everything is safetensors + JSON; nothing is unpickled.

A checkpoint is written under a hidden temporary name and renamed into place, so it either exists
complete or not at all. A process killed while writing leaves only the temporary directory, which
:func:`latest_checkpoint` ignores and the next :func:`save_checkpoint` removes.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
_NAME = re.compile(r"step-(\d{6,})")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model or optimizer it is loaded into."""


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors being trained (live, ``requires_grad``), keyed ``"<adapter>/<key>"``.

    Their order is the optimizer's parameter order, so the optimizer state can be saved by index.
    """
    return {
        f"{name}/{key}": t
        for name in model.peft_config
        for key, t in model.adapter_state_dict(name).items()
        if t.requires_grad
    }


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None; temporary directories are ignored."""
    found = sorted(_complete(Path(output_dir) / CHECKPOINTS))
    return found[-1][1] if found else None


def _complete(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _NAME.fullmatch(p.name)) and (p / STATE).is_file()]


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    rng: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``.

    ``trainer_state`` is the loop's JSON-able progress; ``rng`` defaults to the current RNG states
    (pass states captured earlier to checkpoint an earlier moment).
    """
    final = checkpoint_path(output_dir, step)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; a step is checkpointed once")
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step-*.tmp"):  # from a process killed mid-write; one writer per dir
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        tensors = trainable_tensors(model)
        model.save_pretrained(tmp / "adapter", selected_adapters=sorted({k.split("/", 1)[0] for k in tensors}))
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp / TRAINABLE))
        opt_tensors, opt_index = _flatten_optimizer(optimizer, list(tensors))
        save_file(opt_tensors, str(tmp / OPTIMIZER))
        state = {**trainer_state, "step": step, "optimizer": opt_index, "rng": rng or capture_rng()}
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in sorted(_complete(root))[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the trained tensors, the optimizer state and the RNG states; return the trainer state."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE}); use latest_checkpoint(output_dir)")
    state = json.loads((path / STATE).read_text())
    live, saved = trainable_tensors(model), load_file(str(path / TRAINABLE))
    if set(live) != set(saved):
        missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        raise CheckpointError(
            f"{path} does not fit this model: {len(missing)} trained tensor(s) missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]}); resume with the same base model, "
            f"adapters and trainable flags, or start a new output_dir"
        )
    for key, target in live.items():
        if saved[key].shape != target.shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(saved[key].shape)}, the model's "
                                  f"{tuple(target.shape)}; resume with the same adapter config")
    with torch.no_grad():
        for key, target in live.items():
            target.copy_(saved[key])
    _load_optimizer(optimizer, list(live), state["optimizer"], load_file(str(path / OPTIMIZER)), path)
    restore_rng(state["rng"])
    return state


# -- optimizer state as safetensors + a JSON index --------------------------------------------------
def _flatten_optimizer(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's per-parameter tensors keyed ``"<index>.<name>"``; the index maps index -> parameter
    name and holds each parameter's step count (a scalar, readable in JSON)."""
    state = optimizer.state_dict()["state"]  # {param index: {"step", "exp_avg", "exp_avg_sq"}}
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in state.items() for k, v in s.items() if k != "step"}
    return tensors, {"params": names, "steps": {str(i): int(s["step"]) for i, s in state.items()}}


def _load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], index: dict,
                    tensors: dict[str, torch.Tensor], path: Path) -> None:
    if index["params"] != names:
        raise CheckpointError(f"{path}: the optimizer was saved for other parameters ({len(index['params'])} vs "
                              f"{len(names)} here, or in another order); resume with the same adapters")
    state: dict[int, dict[str, torch.Tensor]] = {int(i): {"step": torch.tensor(float(step))}
                                                 for i, step in index["steps"].items()}
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        state[int(i)][name] = t
    full = optimizer.state_dict()  # keeps the current param_groups (the loop sets lr every step)
    full["state"] = state
    optimizer.load_state_dict(full)  # moves and casts the tensors to each parameter's device


# -- RNG states as JSON ------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if initialised) CUDA generator states, JSON-able."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
        # An uninitialised CUDA generator still holds the seeded state that a resumed run sets again.
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(rng["torch"]))
    for device, s in enumerate(rng["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(_unb64(s), device)


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
