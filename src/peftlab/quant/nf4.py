"""NF4: 4-bit NormalFloat with block-wise absmax scales and double quantisation (QLoRA, Dettmers
et al. 2023, https://arxiv.org/abs/2305.14314).

Pretrained weights are roughly normal, so the 16 levels sit at quantiles of N(0, 1) rather than
evenly apart: each level serves about the same share of the weights. A weight tensor is cut into
blocks of 64 consecutive values (row-major); each block is divided by its absmax, so it lies in
[-1, 1], and each value is replaced by the index of the nearest level. Two 4-bit indices share a
byte (the first in the high nibble).

Double quantisation stores the fp32 absmax of every block (32 bits per 64 weights = 0.5 bit per
weight) in 8 bits: the mean is subtracted, and the centred scales are quantised to int8 in blocks
of 256, each with one fp32 scale. Cost per weight: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits.
QLoRA quantises the centred scales with bitsandbytes' 8-bit dynamic float code; we use symmetric
linear int8, whose error has a closed form (at most scale/254 per block scale).

A quantised tensor is a plain ``dict[str, Tensor]`` (its *state*):

* ``codes``: uint8 (ceil(n/64)·32,) — two level indices per byte, the last block zero-padded;
* ``code``: float (16,) — the levels, so dequantising follows the state's device and dtype;
* with double quantisation ``absmax_q``: int8 (n_blocks,), ``absmax_scale``: float
  (ceil(n_blocks/256),), ``absmax_mean``: float (); without it ``absmax``: float (n_blocks,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_SIZE = 64
SCALE_BLOCK_SIZE = 256

# Probability at the outermost quantile. Q(1) is infinite, so the levels end at
# ½(31/32 + 29/30): the midpoint of the 1 − 1/(2n) end points for n = 16 and n = 15 levels.
# It equals the constant bitsandbytes uses (0.9677083) to 7 digits.
_OUTER_PROBABILITY = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] with an exact zero: (16,) float32.

    As in the paper's asymmetric construction: 8 quantiles of N(0, 1) for the positive half
    (evenly spaced probabilities from 0.5 to the outer one, 0.5 itself dropped), 7 for the negative
    half, one zero, all divided by the largest so that ±1 are levels (a block's absmax is stored
    exactly).
    """
    positive = torch.special.ndtri(torch.linspace(_OUTER_PROBABILITY, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(_OUTER_PROBABILITY, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


NF4_CODE = nf4_code()


# -- second level: the block scales in 8 bits ------------------------------------------------------
def quantize_scales(absmax: torch.Tensor, block_size: int = SCALE_BLOCK_SIZE) -> dict[str, torch.Tensor]:
    """Double quantisation of the (n_blocks,) fp32 absmax: mean-centred, symmetric int8 per block
    of ``block_size`` scales. Each value comes back within ``absmax_scale / 254`` of itself."""
    mean = absmax.mean()
    centred = absmax - mean
    n = centred.numel()
    blocks = F.pad(centred, (0, (-n) % block_size)).view(-1, block_size)  # (n_scale_blocks, 256)
    scale = blocks.abs().amax(dim=1)  # (n_scale_blocks,)
    # A block of identical scales centres to zeros; any positive scale then stores them exactly.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None] * 127).to(torch.int8).view(-1)[:n]
    return {"absmax_q": q, "absmax_scale": scale, "absmax_mean": mean}


def dequantize_scales(state: dict[str, torch.Tensor], block_size: int = SCALE_BLOCK_SIZE) -> torch.Tensor:
    """The (n_blocks,) absmax back from :func:`quantize_scales`'s state (or as stored, without it)."""
    if "absmax" in state:
        return state["absmax"]
    q, scale = state["absmax_q"], state["absmax_scale"]
    per_value = scale.repeat_interleave(block_size)[: q.numel()]  # (n_blocks,)
    return q.to(scale.dtype) / 127 * per_value + state["absmax_mean"]


# -- first level: the weights in 4 bits ----------------------------------------------------------
def quantize(weight: torch.Tensor, *, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """NF4 state of ``weight`` (any shape; read row-major, in blocks of ``block_size`` values)."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"NF4 block_size must be a positive even number (two codes per byte), got {block_size}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, (-n) % block_size)).view(-1, block_size)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]  # in [-1, 1]
    code = NF4_CODE.to(flat.device, copy=True)  # each state owns its levels: never an alias of the constant
    # Nearest level = the number of midpoints between adjacent levels that lie below the value.
    idx = torch.bucketize(normed, (code[1:] + code[:-1]) / 2, out_int32=True).to(torch.uint8).view(-1, 2)
    state = {"codes": (idx[:, 0] << 4) | idx[:, 1], "code": code}
    state.update(quantize_scales(absmax) if double_quant else {"absmax": absmax})
    return state


def dequantize(state: dict[str, torch.Tensor], shape: torch.Size, start: int = 0, end: int | None = None, *,
               block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Values ``start:end`` of the flattened tensor of ``shape``, (end − start,), in the dtype of
    the state's float tensors. Only the blocks covering that range are unpacked, so a weight can
    be dequantised a few rows at a time."""
    n = shape.numel()
    end = n if end is None else end
    first, last = start // block_size, -(-end // block_size)  # blocks [first, last) cover the range
    packed = state["codes"][first * block_size // 2: last * block_size // 2]
    code = state["code"]
    # Byte b holds levels (b >> 4, b & 15): one lookup in a (256, 2) table unpacks both at once.
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)
    absmax = dequantize_scales(state)[first:last]
    values = pairs.index_select(0, packed.int()).view(-1, block_size) * absmax[:, None]  # (blocks, 64)
    offset = first * block_size
    return values.view(-1)[start - offset: end - offset]
