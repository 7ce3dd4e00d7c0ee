"""QuantLinear: a frozen ``nn.Linear`` whose weight is stored quantised and dequantised on the fly.

The quantised weight lives in buffers (it never trains); the bias, if any, stays a (frozen)
parameter in its original precision. The class subclasses ``nn.Linear`` — as bitsandbytes'
``Linear4bit`` does — so everything that looks for linear layers (``target_modules``,
``"all-linear"``, ``transformers``' own checks) finds it, and ``weight`` is a property that returns
the dequantised (d_out, d_in) tensor for code that reads it (adapter layers read its dtype, device
and, for IA3's ΔW, its values).

Memory: forward and backward dequantise again each time instead of keeping a dense W. With plain
``F.linear`` on a dequantised W, autograd would hold that dense W for every layer until backward —
an fp32 copy of the whole base. :class:`_DequantizedLinear` keeps only a reference to the module and
dequantises once more in backward. The transient dense W of one layer exists only inside its call;
``chunk_rows`` bounds it further to ``chunk_rows × d_in`` values, at the price of several smaller
matmuls and a concatenation of the output (slower; worth it only when one layer's dense weight is
itself too large to hold).

Merging (``PeftModel.merge_adapter``) swaps the module for :meth:`QuantLinear.dequantize`'s dense
copy and, with ``merge_and_unload(requantize=True)``, back via :meth:`QuantLinear.quantize_like`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import int8, nf4

SCHEMES = ("nf4", "int8")
# Each scheme's quantisation options and their defaults.
_OPTIONS: dict[str, dict] = {"nf4": {"block_size": nf4.BLOCK_SIZE, "double_quant": True}, "int8": {}}


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; choose one of {SCHEMES}")


class QuantLinear(nn.Linear):
    """y = x Wᵀ + b with W (d_out, d_in) held as an NF4 or int8 state (see :mod:`.nf4`, :mod:`.int8`).

    Build one with :meth:`from_linear`. ``options`` are the scheme's quantisation options
    (NF4: ``block_size``, ``double_quant``), kept so :meth:`quantize_like` can repeat them.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, state: dict[str, torch.Tensor],
                 bias: torch.Tensor | None, *, options: dict | None = None, chunk_rows: int | None = None) -> None:
        # nn.Linear.__init__ would allocate a dense weight parameter, which is exactly what we avoid.
        nn.Module.__init__(self)
        check_scheme(scheme)
        if chunk_rows is not None and chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive number of rows or None (whole weight), got {chunk_rows}")
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.options = dict(options or {})
        self.chunk_rows = chunk_rows
        self._state_keys = tuple(state)
        for key, tensor in state.items():
            self.register_buffer(key, tensor)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "nf4", *, chunk_rows: int | None = None,
                    **options) -> "QuantLinear":
        """Quantise ``linear``'s weight with ``scheme`` ("nf4" or "int8"); ``options`` as in
        :func:`.nf4.quantize` (int8 takes none)."""
        return cls.from_weight(linear.weight, linear.bias, scheme, chunk_rows=chunk_rows, **options)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str = "nf4", *,
                    dtype: torch.dtype | None = None, chunk_rows: int | None = None, **options) -> "QuantLinear":
        """A layer for the (d_out, d_in) ``weight`` quantised with ``scheme``, and ``bias``; it
        dequantises to ``dtype`` (default: the weight's)."""
        check_scheme(scheme)
        unknown = sorted(set(options) - set(_OPTIONS[scheme]))
        if unknown:
            raise ValueError(f"{scheme} quantisation takes options {sorted(_OPTIONS[scheme]) or 'none'}, got {unknown}")
        options = {**_OPTIONS[scheme], **options}
        quantize = nf4.quantize if scheme == "nf4" else int8.quantize
        state = quantize(weight, **options)
        dtype = dtype or weight.dtype
        # Scales and levels take the layer's dtype, so the dequantised weight has it too.
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
        d_out, d_in = weight.shape
        return cls(d_in, d_out, scheme, state, bias, options=options, chunk_rows=chunk_rows)

    # -- the weight, dequantised ------------------------------------------------------------------
    @property
    def state(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in self._state_keys}

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` of the dequantised weight: (end − start, d_in)."""
        shape = torch.Size((self.out_features, self.in_features))
        a, b = start * self.in_features, end * self.in_features
        if self.scheme == "nf4":
            flat = nf4.dequantize(self.state, shape, a, b, block_size=self.options["block_size"])
        else:
            flat = int8.dequantize(self.state, shape, a, b)
        return flat.view(end - start, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantised weight (d_out, d_in); a fresh tensor: writing into it changes nothing."""
        return self.dequantize_rows(0, self.out_features)

    def row_chunks(self) -> Iterator[tuple[int, int]]:
        step = self.chunk_rows or self.out_features
        for start in range(0, self.out_features, step):
            yield start, min(start + step, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self.bias, self)

    # -- the protocol merging uses (see AdapterLayer.dequantize_base) -------------------------------
    def dequantize(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantised weight and this layer's bias (frozen)."""
        return dense_linear(self.weight, self.bias)

    def quantize_like(self, linear: nn.Linear) -> "QuantLinear":
        """``linear`` quantised with this layer's scheme and options."""
        return type(self).from_linear(linear, self.scheme, chunk_rows=self.chunk_rows, **self.options)

    def quantized_nbytes(self) -> int:
        """Bytes of the quantised weight (codes, scales and levels; not the bias)."""
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"scheme={self.scheme}{opts}"


class _DequantizedLinear(torch.autograd.Function):
    """x Wᵀ + b with W dequantised in forward and again in backward (nothing dense is saved).

    W is frozen, so backward returns the gradient of x (and of b, should someone unfreeze it).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        outs = [F.linear(x, layer.dequantize_rows(a, b).to(x.dtype), None if bias is None else bias[a:b].to(x.dtype))
                for a, b in layer.row_chunks()]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (..., d_out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # dL/dx = dL/dy · W, summed over row chunks of W: (..., d_out) @ (d_out, d_in).
            grad_x = sum(grad_out[..., a:b] @ layer.dequantize_rows(a, b).to(grad_out.dtype)
                         for a, b in layer.row_chunks())
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        return grad_x, grad_bias, None


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen dense ``nn.Linear`` holding ``weight`` (d_out, d_in) and ``bias``: what a quantised
    layer merges into."""
    d_out, d_in = weight.shape
    dense = nn.utils.skip_init(nn.Linear, d_in, d_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense.requires_grad_(False)
