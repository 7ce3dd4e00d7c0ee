"""int8 weight-only: per-row absmax, error at most absmax/254 per row."""

import pytest
import torch

from peftlab.quant import int8


def test_roundtrip_error_is_within_absmax_over_254_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 70, generator=g) * torch.logspace(-3, 1, 33)[:, None]  # rows of very different scale
    w[5] = 0  # an all-zero row
    state = int8.quantize(w)
    assert state["qweight"].dtype == torch.int8 and state["scale"].shape == (33,)
    back = int8.dequantize(state, w.shape).view(w.shape)
    absmax = w.abs().amax(dim=1, keepdim=True)
    assert bool(((back - w).abs() <= absmax / 254 * (1 + 1e-6)).all())
    assert torch.equal(back[5], torch.zeros(70))
    # Each row's largest weight is stored exactly, as ±127.
    assert bool((state["qweight"].abs().amax(dim=1)[absmax.squeeze(1) > 0] == 127).all())


def test_row_ranges_dequantise_like_slices():
    w = torch.randn(9, 10)
    state = int8.quantize(w)
    whole = int8.dequantize(state, w.shape)
    assert torch.equal(int8.dequantize(state, w.shape, 30, 70), whole[30:70])


def test_only_matrices():
    with pytest.raises(ValueError, match=r"\(d_out, d_in\) weight, got shape \(4,\)"):
        int8.quantize(torch.ones(4))
