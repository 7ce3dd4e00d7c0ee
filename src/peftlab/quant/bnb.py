"""bitsandbytes' NF4 layer (``bnb.nn.Linear4bit``): ``quantize_model``'s choice on CUDA when
bitsandbytes is installed, and on any device with ``backend="bitsandbytes"`` (its CPU path runs too,
slower than its CUDA kernels).

Its CUDA kernels dequantise faster than :class:`~peftlab.quant.linear.QuantLinear`'s pure-PyTorch
path. The format is QLoRA's NF4 too (bitsandbytes stores the double-quantised scales with its 8-bit
dynamic code where we use linear int8). The subclass below adds what peftlab needs of a compressed
base: ``dense_weight`` (the dequantised weight adapters read: LoRA's dtype, DoRA's norms, (IA)³'s
ΔW), ``dequantize`` and ``quantize_like`` for merging, ``quantized_nbytes`` for
:func:`memory_report`.

Tests run this layer on CPU (tests/quant/test_bnb.py) and, where a GPU is present, on CUDA
(tests/test_cuda.py); bitsandbytes' functional API is also the oracle for :mod:`.nf4`'s levels.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn as nn

from .linear import dense_linear


def available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


@functools.cache
def _layer_class() -> type[nn.Module]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    class BnbLinearNF4(bnb.nn.Linear4bit):
        """``bnb.nn.Linear4bit`` (quant_type="nf4") with peftlab's merge protocol."""

        def dense_weight(self) -> torch.Tensor:
            """The dequantised weight (d_out, d_in) in the compute dtype: what adapters read."""
            weight = bnb_functional.dequantize_4bit(self.weight.data, self.weight.quant_state)
            return weight.to(self.compute_dtype or weight.dtype)

        def dequantize(self) -> nn.Linear:
            return dense_linear(self.dense_weight(), self.bias)

        def quantize_like(self, linear: nn.Linear) -> nn.Module:
            return to_bnb_nf4(linear, block_size=self.weight.blocksize, double_quant=self.weight.compress_statistics)

        def quantized_nbytes(self) -> int:
            qs = self.weight.quant_state
            tensors = [self.weight.data, qs.absmax, qs.code]
            if qs.nested:
                tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
            return sum(t.numel() * t.element_size() for t in tensors)

    return BnbLinearNF4


def to_bnb_nf4(linear: nn.Linear, *, block_size: int, double_quant: bool,
               device: torch.device | None = None) -> nn.Module:
    """``linear`` as a bitsandbytes NF4 layer on ``device`` (default: the layer's own); the dense
    weight goes there only as it is quantised."""
    import bitsandbytes as bnb

    device = linear.weight.device if device is None else device
    layer = _layer_class()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           compute_dtype=linear.weight.dtype, compress_statistics=double_quant, quant_type="nf4")
    # Params4bit quantises when it is moved to a CUDA device.
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                                     blocksize=block_size, compress_statistics=double_quant)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device)
