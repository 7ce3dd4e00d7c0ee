"""Adapter directories on disk.

One adapter = one directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
Tensor keys always use Hugging Face PEFT's layout (``base_model.model.<module path>.<tensor>``,
adapter name stripped), so the weights file is the same in both formats; only the config differs:

* ``"peftlab"``: our config, ``{"method": "lora", ...}`` — lossless for every method;
* ``"peft"``: Hugging Face PEFT's config (``{"peft_type": "LORA", ...}``), for methods it has.

Reading detects the format. Files are written atomically; pickled ``.bin`` weights are refused
unless the caller opts in (and even then read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
KEY_PREFIXES = (KEY_PREFIX, "base_model.")  # longest first: both are stripped on read
FORMATS = ("peftlab", "peft")


class AdapterLoadError(ValueError):
    """An adapter directory is missing, incomplete, corrupt or unsafe."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_adapter(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None, key_prefix: str = KEY_PREFIX) -> None:
    """Write one adapter directory: weights first, config last (the config marks it complete)."""
    directory = Path(directory)
    # safetensors refuses shared or non-contiguous storage; adapters are small, copies are cheap.
    # Module tensors ("<path>.<tensor>") get PEFT's prefix; model-level ones ("prompt_embeddings") don't.
    flat = {(key_prefix + k if "." in k else k): v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(flat, str(p), metadata=metadata or {"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))


def read_adapter(directory: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read (config dict, tensors by module-path key) from an adapter directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(f"adapter directory {str(directory)!r} does not exist")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterLoadError(f"{str(directory)!r} has no {CONFIG_NAME}; is it an adapter directory saved by save_pretrained()?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {exc}") from None

    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise AdapterLoadError(f"{weights} is not a readable safetensors file ({exc}); re-save the adapter") from None
    elif (directory / PICKLE_WEIGHTS_NAME).is_file():
        if not allow_pickle:
            raise AdapterLoadError(
                f"{directory / PICKLE_WEIGHTS_NAME} is a pickle file, which can run code when loaded; "
                f"pass allow_pickle=True only if you trust its source, or convert it to safetensors"
            )
        tensors = torch.load(directory / PICKLE_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise AdapterLoadError(f"{str(directory)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return config, {_strip_prefix(k): v for k, v in tensors.items()}


def _strip_prefix(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key
