"""Load a checkpoint straight into a quantised model, one tensor at a time.

``from_pretrained`` followed by :func:`~peftlab.quant.quantize_model` holds the whole model in
``dtype`` before a single layer is quantised: a 7 B model needs 28 GB of fp32 to end up as 3.7 GB
of NF4. :func:`stream_quantized` never holds more than one tensor of the checkpoint in ``dtype``:

1. the model is built from its config without initialising its weights (``no_init_weights``), so
   its parameters are allocated but never written — untouched pages take no memory;
2. the checkpoint's safetensors files are read tensor by tensor: the weight of a layer
   :func:`~peftlab.quant.quantize_model` would quantise goes straight into its quantised state and
   is dropped; every other tensor replaces its placeholder;
3. the quantised layers are swapped in, weights are tied as the config says, and the model is put in
   eval mode with its generation config, as ``from_pretrained`` leaves it.

It serves only the case it can serve exactly — a local directory of safetensors files whose
tensor names are the model's own, every parameter present — and returns None otherwise (a Hub id,
``.bin`` or GGUF files, a new head such as a classifier, renamed keys, extra ``from_pretrained``
options): the caller then loads and quantises the ordinary way. A test checks that both ways give
the same tensors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from ..quant import QuantLinear, quantizable
from ..runtime import release_freed_memory


def checkpoint_files(source: str | Path) -> list[Path] | None:
    """The safetensors files of a local model directory (sharded or not); None if it has none."""
    directory = Path(source)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else None


def stream_quantized(source: str | Path, model_class: type, dtype: torch.dtype, scheme: str,
                     kwargs: dict[str, Any]) -> PreTrainedModel | None:
    """``model_class.from_pretrained(source)`` with its linear layers quantised by ``scheme`` (as
    :func:`~peftlab.quant.quantize_model` does with its defaults), read tensor by tensor; None when
    the checkpoint cannot be read that way (see the module docstring)."""
    files = checkpoint_files(source) if Path(source).is_dir() else None
    if files is None or kwargs:
        return None
    config = AutoConfig.from_pretrained(source)
    if dtype != torch.float32 and getattr(model_class, "_keep_in_fp32_modules", None):
        return None
    with no_init_weights():
        model = model_class.from_config(config, dtype=dtype)
    model.tie_weights()

    names = {key for path in files for key in _header(path)[0]}  # the checkpoint's tensors
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False) if n in model.state_dict()}
    groups: dict[int, list[str]] = {}  # a tied parameter answers to several names
    for name, param in params.items():
        groups.setdefault(id(param), []).append(name)
    missing = [g for g in groups.values() if not any(n in names for n in g)] + [b for b in buffers if b not in names]
    if missing or set(names) - set(params) - set(buffers):
        return None  # a new head, renamed or extra keys: from_pretrained knows how to handle those

    shared = {id(p) for p in params.values() if len(groups[id(p)]) > 1}
    targets = {path: m for path, m in quantizable(model) if id(m.weight) not in shared}
    states: dict[str, torch.Tensor] = {}  # target path -> its weight, until its bias is loaded too
    loaded: set[str] = set()
    with torch.no_grad():
        for path in files:
            for key, tensor in _tensors(path):
                loaded.add(key)
                owner, _, leaf = key.rpartition(".")
                if owner in targets and leaf == "weight":
                    states[owner] = tensor
                else:
                    # A copy: the read buffer is shared with numpy, so its storage cannot be resized.
                    value = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
                    if key in params:
                        params[key].data = value
                    else:
                        model.get_submodule(owner)._buffers[leaf] = value
                linear = targets.get(owner)
                if owner in states and (linear.bias is None or owner + ".bias" in loaded):
                    weight = states.pop(owner).to(dtype)
                    model.set_submodule(owner, QuantLinear.from_weight(weight, linear.bias, scheme, dtype=dtype))
                del tensor
    if states:  # cannot happen when every name was present; refuse rather than keep placeholders
        raise RuntimeError(f"layers left unquantised while streaming {source}: {sorted(states)}")
    model.eval()  # ties made before loading hold: tensors were assigned into the tied parameters
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            pass  # no generation_config.json: from_config's default, as from_pretrained leaves it
    release_freed_memory()
    return model


# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format spec).
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets) and where data begins:
    8 bytes little-endian header length, the JSON header, then the data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        table = json.loads(f.read(length))
    table.pop("__metadata__", None)
    return table, 8 + length


def _tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file, read with plain file reads into memory of its own.

    Not through a memory map (``safe_open``): every page read through a map stays resident while
    the map is open, so reading a whole one-file checkpoint that way holds the whole file in memory
    — the very peak streaming is meant to avoid. A read into a fresh buffer is freed with its tensor.
    """
    table, start = _header(path)
    with open(path, "rb", buffering=0) as f:
        for name, entry in sorted(table.items(), key=lambda item: item[1]["data_offsets"][0]):
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which peftlab cannot "
                                 f"quantise from; load it without quantize=")
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)  # torch's own memory, freed with the tensor
            f.seek(start + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise ValueError(f"{path} is truncated: tensor {name} ends past the end of the file")
            yield name, raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
