"""The server's checkpoint after every round: the global adapter and everything to continue.

One directory per round, ``<out>/rounds/round-000003/``::

    adapter/                 the global adapter as save_pretrained writes it (loadable on its own:
                             PeftModel.from_pretrained(base, ".../adapter"))
    strategy.safetensors     server optimizer state (FedAdam's moments), when the strategy has one
    state.json               the round, the run's options, per-round history and byte counts

Written under a hidden temporary name and renamed into place, so a round's checkpoint exists
complete or not at all; :func:`latest_round` ignores leftovers of a killed process. Only the
newest ``keep`` rounds stay on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import formats
from ..config import AdapterConfig

ROUNDS = "rounds"
STATE = "state.json"  # written last: its presence marks a complete checkpoint
STRATEGY = "strategy.safetensors"
_NAME = re.compile(r"round-(\d{6,})")


def round_path(out: str | os.PathLike, round: int) -> Path:
    return Path(out) / ROUNDS / f"round-{round:06d}"


def latest_round(out: str | os.PathLike) -> Path | None:
    """The newest complete round checkpoint under ``out``, or None."""
    root = Path(out) / ROUNDS
    if not root.is_dir():
        return None
    done = [(int(m[1]), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and (p / STATE).is_file()]
    return max(done)[1] if done else None


def save_round(out: str | os.PathLike, round: int, *, config: AdapterConfig, arrays: dict[str, np.ndarray],
               state: dict[str, Any], strategy_tensors: dict[str, np.ndarray] | None = None, keep: int = 2) -> Path:
    """Write round ``round``'s checkpoint atomically; keep the newest ``keep`` rounds."""
    root = Path(out) / ROUNDS
    root.mkdir(parents=True, exist_ok=True)
    final = round_path(out, round)
    for leftover in root.glob(".round-*.tmp"):  # from a process killed mid-write; one server per dir
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        formats.write_adapter(tmp / "adapter", config.to_dict(), _tensors(arrays))
        if strategy_tensors:
            save_file(_tensors(strategy_tensors), str(tmp / STRATEGY))
        (tmp / STATE).write_text(json.dumps({"round": round, **state}, indent=1) + "\n")
        if final.exists():  # a resumed run redoing a round
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted((int(m[1]), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)))
    for _, old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def load_round(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """(global adapter arrays, state.json, strategy tensors) of a round checkpoint."""
    path = Path(path)
    _, tensors = formats.read_adapter(path / "adapter")
    state = json.loads((path / STATE).read_text())
    strategy = {k: v.numpy() for k, v in load_file(str(path / STRATEGY)).items()} if (path / STRATEGY).is_file() else {}
    return {k: v.float().numpy() for k, v in tensors.items()}, state, strategy
