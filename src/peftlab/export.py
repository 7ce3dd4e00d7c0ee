"""From an adapter directory to a usable model: on its base (:func:`load_adapted`), or merged into
a standalone ``transformers`` directory (:func:`merge_to_dir`) that plain
``AutoModelFor....from_pretrained`` reads, with no peftlab installed.

The base model's task comes from the adapter's ``task_type`` (what it was trained for): a LoRA
trained on a causal LM needs the LM head, a classifier needs its (trained) classification head.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from .config import AdapterConfig, ConfigError
from .model import PeftModel, read_adapter_dir
from .models import load
from .targeting import matches

#: Hugging Face task types -> :func:`peftlab.models.load` tasks; anything else loads the backbone.
TASK_OF_TYPE = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls", "SEQ_2_SEQ_LM": "seq2seq"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def task_of(config: AdapterConfig, default: str = "base") -> str:
    """The :func:`peftlab.models.load` task an adapter was trained for (``default`` if unrecorded)."""
    return TASK_OF_TYPE.get(config.task_type or "", default)


def _num_labels(config: AdapterConfig, tensors: dict[str, torch.Tensor], adapter_dir: Path) -> int:
    """Classes of a classifier adapter, read off its saved head (``modules_to_save``): the output
    dimension of the head's last 2-D weight in key order (``score.weight``; ``classifier.weight``;
    ``classifier.out_proj.weight`` after ``classifier.dense.weight``)."""
    heads = config.effective_modules_to_save

    def in_head(key: str) -> bool:
        parts = key.split(".")[:-1]
        return any(matches(".".join(parts[:i]), heads) for i in range(1, len(parts) + 1))

    weights = sorted(k for k, t in tensors.items() if t.dim() == 2 and k.endswith(".weight") and in_head(k))
    if not weights:
        raise ConfigError(
            f"{adapter_dir} is a SEQ_CLS adapter without a saved classification head (modules_to_save="
            f"{list(heads)} matched none of its tensors), so the number of labels is unknown; pass num_labels"
        )
    return int(tensors[weights[-1]].shape[0])


def load_adapted(base: str, adapter_dir: str | os.PathLike | None = None, *, task: str | None = None,
                 num_labels: int | None = None, default_task: str = "base"):
    """``(model, tokenizer)``: ``base`` (alias, local dir or hub id) in fp32, with the adapter saved
    in ``adapter_dir`` attached as ``"default"`` and active (frozen), or the plain base model when
    ``adapter_dir`` is None.

    ``task`` defaults to the adapter's ``task_type`` (:data:`TASK_OF_TYPE`), else ``default_task``;
    for ``"seq-cls"``, ``num_labels`` defaults to the size of the adapter's saved head.
    """
    if adapter_dir is None:
        return load(base, task=task or default_task, num_labels=num_labels)
    adapter_dir = Path(adapter_dir)
    config, tensors = read_adapter_dir(adapter_dir, allow_pickle=False)
    task = task or task_of(config, default_task)
    if task == "seq-cls" and num_labels is None:
        num_labels = _num_labels(config, tensors, adapter_dir)
    model, tokenizer = load(base, task=task, num_labels=num_labels)
    return PeftModel.from_pretrained(model, adapter_dir), tokenizer


def merge_to_dir(base: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 max_shard_size: str | int = "2GB", dtype: str | torch.dtype | None = None,
                 task: str | None = None, num_labels: int | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter in ``adapter_dir`` into ``base`` and save the result to ``out_dir``.

    ``out_dir`` gets sharded safetensors (``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json`` once the weights exceed ``max_shard_size``), ``config.json``,
    the generation config and the tokenizer: a plain ``transformers`` model directory. The merge
    runs in fp32; ``dtype`` ("float32", "bfloat16", "float16" or a torch dtype; default fp32) is
    what the saved weights are cast to.

    Written atomically: everything goes to a hidden directory beside ``out_dir``, renamed into place
    at the end. A non-empty ``out_dir`` is refused unless ``overwrite``. Methods without a weight
    delta (prompt, prefix, bottleneck, ...) raise :class:`ConfigError`: serve those unmerged.
    ``task``/``num_labels``: as in :func:`load_adapted`.
    """
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    target_dtype = _dtype(dtype)
    _check_out_dir(out, overwrite, [adapter_dir, Path(base)])
    peft_model, tokenizer = load_adapted(base, adapter_dir, task=task, num_labels=num_labels)
    method = peft_model.peft_config["default"].method
    try:
        merged = peft_model.merge_and_unload()
    except ConfigError:
        raise ConfigError(
            f"{adapter_dir} holds a {method} adapter, which has no weight delta to fold into the base weights "
            f"(it adds its own computation); serve it unmerged instead: the base model plus the adapter "
            f"directory, e.g. `peftlab generate {base} --adapter {adapter_dir} --prompt ...`"
        ) from None
    merged.to(target_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    try:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def _check_out_dir(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Fail before the (slow) merge, not after it."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file; give a directory for the merged model")
    for source in inputs:
        if source.exists() and out.resolve() == source.resolve():
            raise ConfigError(f"the output directory {out} is also an input; write the merged model elsewhere")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another directory or pass overwrite=True "
                              f"(--overwrite) to replace it")


def _publish(staging: Path, out: Path) -> None:
    """Rename ``staging`` onto ``out``; an existing ``out`` is moved aside first and deleted after."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex}")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
