"""int8 weight-only quantisation: one absmax scale per output row.

For W (d_out, d_in), row i is stored as round(W[i] / s_i) in [-127, 127] with s_i = max|W[i]| / 127,
so every weight comes back within s_i / 2 = max|W[i]| / 254 of itself. Activations stay in floating
point (weight-only): the weight is dequantised before the matmul. Cost per weight: 8 + 32/d_in bits.

State: ``qweight``: int8 (d_out, d_in); ``scale``: float (d_out,).
"""

from __future__ import annotations

import torch


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 state of a (d_out, d_in) weight."""
    if weight.dim() != 2:
        raise ValueError(f"int8 quantisation takes a (d_out, d_in) weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127  # (d_out,)
    # An all-zero row stores zeros under any positive scale.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scale": scale}


def dequantize(state: dict[str, torch.Tensor], shape: torch.Size, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Values ``start:end`` of the flattened (d_out, d_in) weight, (end − start,); row-aligned
    ranges (as :class:`~peftlab.quant.linear.QuantLinear` asks for) touch only their rows."""
    d_in = shape[1]
    end = shape.numel() if end is None else end
    first, last = start // d_in, -(-end // d_in)  # rows [first, last) cover the range
    scale = state["scale"]
    rows = state["qweight"][first:last].to(scale.dtype) * scale[first:last, None]  # (rows, d_in)
    return rows.view(-1)[start - first * d_in: end - first * d_in]
