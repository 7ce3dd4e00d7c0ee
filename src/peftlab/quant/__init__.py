"""A quantised, frozen base model for adapters to train on (QLoRA-style).

``quantize_model(model, "nf4")`` replaces the model's ``nn.Linear`` layers by
:class:`~peftlab.quant.linear.QuantLinear` (NF4: ≈ 4.127 bits per weight; int8: 8 + 32/d_in), then
``get_peft_model`` attaches adapters as usual: the layers are still ``nn.Linear`` to targeting, and
their ``weight`` is dequantised on read. Merging dequantises the adapted layers (see
``PeftModel.merge_and_unload(requantize=...)``).

The output and classification heads are skipped by default. The output head is often tied to the
input embedding (SmolLM2), so quantising it saves nothing — the fp32 table stays for the lookup —
and its error lands directly on the logits; QLoRA and bitsandbytes keep it in 16 bits too.
Classification heads are new and trained whole (``modules_to_save``), so they must stay dense.
Embeddings are lookups, not ``nn.Linear``, and are left alone.

A quantised base is for training and serving adapters: save the adapters, not the base
(its ``state_dict`` holds codes, which ``from_pretrained`` cannot read).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import AdapterLayer
from ..targeting import matches
from . import bnb
from .linear import SCHEMES, QuantLinear, check_scheme
from .nf4 import BLOCK_SIZE, NF4_CODE, nf4_code

BACKENDS = ("auto", "torch", "bitsandbytes")
DEFAULT_SKIP = ("lm_head", "score", "classifier", "qa_outputs")


def _use_bitsandbytes(backend: str, scheme: str, device: torch.device) -> bool:
    """auto: bitsandbytes for NF4 weights on CUDA when it is installed; bitsandbytes: always (its
    ``Linear4bit`` runs on CPU too, slower than on CUDA); torch: never."""
    if backend == "torch":
        return False
    if backend == "bitsandbytes":
        if scheme != "nf4" or not bnb.available():
            raise ValueError(
                f"backend='bitsandbytes' needs scheme='nf4' (got {scheme!r}) and bitsandbytes installed "
                f"({'yes' if bnb.available() else 'no: pip install bitsandbytes'}); or use backend='torch' or 'auto'"
            )
        return True
    return scheme == "nf4" and device.type == "cuda" and bnb.available()


def quantizable(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of every layer :func:`quantize_model` replaces: plain ``nn.Linear`` modules not
    matched by ``skip``."""
    return [(path, m) for path, m in model.named_modules() if type(m) is nn.Linear and not matches(path, skip)]


def quantize_model(model: nn.Module, scheme: str = "nf4", *, skip: tuple[str, ...] = DEFAULT_SKIP,
                   block_size: int = BLOCK_SIZE, double_quant: bool = True, chunk_rows: int | None = None,
                   backend: str = "auto", device: str | torch.device | None = None) -> nn.Module:
    """Quantise every ``nn.Linear`` of ``model`` in place (and return it).

    Args:
        scheme: ``"nf4"`` (block-wise 4-bit NormalFloat) or ``"int8"`` (per-row absmax).
        skip: module names or dotted suffixes left dense (default: the output/classification heads).
        block_size, double_quant: NF4 options (block of 64 weights per scale; scales in 8 bits).
        chunk_rows: dequantise this many output rows at a time in forward/backward (None: whole
            weight; see :mod:`.linear` for the memory trade-off).
        backend: ``"auto"`` uses bitsandbytes' ``Linear4bit`` for NF4 on CUDA when installed,
            ``"torch"`` always :class:`QuantLinear`, ``"bitsandbytes"`` insists on bitsandbytes.
        device: move the model there, each layer just before it is quantised, so a dense model
            on the CPU reaches a GPU already quantised (never whole and dense on the GPU), and
            ``"auto"`` sees the layer on the device it will run on. None: leave it where it is.

    Only plain ``nn.Linear`` modules are replaced: subclasses, already-quantised layers and GPT-2's
    ``Conv1D`` (weights stored transposed; a merged model must keep its layout) stay as they are.
    """
    check_scheme(scheme)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("the model already has adapter layers; quantize the base model first, then call get_peft_model")
    options = {"block_size": block_size, "double_quant": double_quant} if scheme == "nf4" else {}
    for path, linear in quantizable(model, skip):
        target = linear.weight.device if device is None else torch.device(device)
        if _use_bitsandbytes(backend, scheme, target):
            layer = bnb.to_bnb_nf4(linear, block_size=block_size, double_quant=double_quant, device=target)
        else:
            layer = QuantLinear.from_linear(linear.to(target), scheme, chunk_rows=chunk_rows, **options)
        model.set_submodule(path, layer)
    return model if device is None else model.to(device)


def memory_report(model: nn.Module) -> dict[str, int | float | None]:
    """Memory of the quantised weights against the same weights in fp32.

    Keys: ``quantized_layers``, ``quantized_params`` (weights they hold), ``quantized_bytes``
    (codes, scales, levels), ``fp32_bytes`` (4 bytes per weight), ``ratio`` (quantized / fp32;
    None without quantised layers), ``bits_per_param``, and ``model_bytes``: every parameter and
    buffer of the model, shared tensors once — the whole footprint, dense heads and embeddings
    included.
    """
    layers = [m for m in model.modules() if hasattr(m, "quantized_nbytes")]
    params = sum(m.in_features * m.out_features for m in layers)
    quantized = sum(m.quantized_nbytes() for m in layers)
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return {
        "quantized_layers": len(layers),
        "quantized_params": params,
        "quantized_bytes": quantized,
        "fp32_bytes": 4 * params,
        "ratio": quantized / (4 * params) if params else None,
        "bits_per_param": 8 * quantized / params if params else None,
        "model_bytes": total,
    }


__all__ = ["BACKENDS", "DEFAULT_SKIP", "NF4_CODE", "QuantLinear", "SCHEMES", "memory_report", "nf4_code",
           "quantizable", "quantize_model"]
