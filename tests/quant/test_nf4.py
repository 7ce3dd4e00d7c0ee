"""NF4 against its definition: the published code book, nearest-level rounding within a block's
absmax, and the closed-form error of double-quantised scales."""

import pytest
import torch

from peftlab.quant import nf4

# Dettmers et al. 2023 (arXiv 2305.14314), appendix E; the same table ships in bitsandbytes.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
HALF_MAX_GAP = float((nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max()) / 2  # 0.152, between -1 and -0.696


def weights(shape=(37, 100), seed=0):
    """Normal weights with a few outliers; 3,700 values = 57 full blocks and one of 52."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (20,), generator=g)] *= 30
    return w


def block_absmax(w, block=nf4.BLOCK_SIZE):
    flat = torch.nn.functional.pad(w.reshape(-1), (0, (-w.numel()) % block)).view(-1, block)
    return flat.abs().amax(dim=1).repeat_interleave(block)[: w.numel()]  # (n,): each value's block absmax


def test_code_book_is_derived_from_normal_quantiles_and_matches_the_paper():
    code = nf4.nf4_code()
    torch.testing.assert_close(code, torch.tensor(PUBLISHED_NF4), atol=1e-6, rtol=0)
    assert code[7] == 0 and code[0] == -1 and code[-1] == 1  # exact zero, absmax stored exactly
    assert bool((code[1:] > code[:-1]).all())
    assert HALF_MAX_GAP == pytest.approx((1 - 0.6961928009986877) / 2, abs=1e-6)


def test_codes_pack_two_per_byte():
    w = weights()
    state = nf4.quantize(w, double_quant=False)
    assert state["codes"].dtype == torch.uint8 and state["codes"].numel() == 58 * 32
    assert state["absmax"].shape == (58,)


def test_roundtrip_error_is_within_half_the_largest_gap_times_block_absmax():
    w = weights()
    state = nf4.quantize(w, double_quant=False)
    back = nf4.dequantize(state, w.shape).view(w.shape)
    absmax = block_absmax(w)
    err = (back - w).abs().reshape(-1)
    assert bool((err <= HALF_MAX_GAP * absmax * (1 + 1e-6)).all()), f"worst excess {(err / absmax).max():.4f}"
    # Stronger: every value went to the nearest level of its block.
    normed = w.reshape(-1) / absmax
    chosen = back.reshape(-1) / absmax
    nearest = (normed[:, None] - nf4.NF4_CODE[None, :]).abs().min(dim=1).values
    assert bool(((normed - chosen).abs() <= nearest + 1e-6).all())


def test_double_quantised_scales_error_bound():
    w = weights((96, 700))  # 1,050 blocks = 5 scale blocks (the last one partial)
    absmax = block_absmax(w)[:: nf4.BLOCK_SIZE]
    sq = nf4.quantize_scales(absmax)
    assert sq["absmax_q"].dtype == torch.int8 and sq["absmax_scale"].shape == (5,)
    back = nf4.dequantize_scales(sq)
    bound = (sq["absmax_scale"] / 254).repeat_interleave(nf4.SCALE_BLOCK_SIZE)[: absmax.numel()]
    assert bool(((back - absmax).abs() <= bound + 1e-7).all())
    # Weights: rounding to a level, plus |level| ≤ 1 times the scale's own error.
    state = nf4.quantize(w)
    err = (nf4.dequantize(state, w.shape).view(w.shape) - w).abs().reshape(-1)
    per_value = (HALF_MAX_GAP * absmax + bound + 1e-7).repeat_interleave(nf4.BLOCK_SIZE)[: w.numel()]
    assert bool((err <= per_value).all())


def test_zero_blocks_and_equal_scales_are_exact():
    w = torch.zeros(4, 64)
    w[1, 3], w[2, 5], w[3, 0] = 0.5, -0.5, 0.5  # block 0 all zeros, the others hold only ±absmax
    assert torch.equal(nf4.dequantize(nf4.quantize(w, double_quant=False), w.shape).view(w.shape), w)
    # Equal block scales centre to zeros, which any second-level scale stores exactly.
    w[0, 9] = -0.5
    state = nf4.quantize(w)
    assert float(state["absmax_scale"]) == 0.0
    assert torch.equal(nf4.dequantize(state, w.shape).view(w.shape), w)


def test_any_range_dequantises_like_a_slice_of_the_whole():
    w = weights()
    state = nf4.quantize(w)
    whole = nf4.dequantize(state, w.shape)
    for start, end in [(0, 1), (63, 65), (100, 3700), (3650, 3700), (640, 1280)]:
        assert torch.equal(nf4.dequantize(state, w.shape, start, end), whole[start:end])


def test_odd_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size must be a positive even number"):
        nf4.quantize(torch.ones(4, 4), block_size=63)


def test_same_levels_as_bitsandbytes_nf4():
    """bitsandbytes (QLoRA's own NF4, on CPU here) as the oracle: without double quantisation every
    weight dequantises to the same value (a different level would be ≥ 0.08 × its block absmax
    away); with it, the scales are stored differently (bitsandbytes: 8-bit dynamic code; ours:
    linear int8), and the round-trip error stays that of bitsandbytes."""
    import bitsandbytes.functional as bnb

    w = weights((96, 160), seed=3)
    ours = nf4.dequantize(nf4.quantize(w, double_quant=False), w.shape).view(w.shape)
    theirs = bnb.dequantize_4bit(*bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False))
    assert float(((ours - theirs).abs().reshape(-1) / block_absmax(w)).max()) < 1e-5

    # Normal weights, as pretrained ones are. (With the ×30 outliers of `weights`, linear int8 scales
    # come out 2-6 % worse than bitsandbytes' dynamic code: a block of scales holding one outlier
    # keeps less relative precision for its small ones.)
    w = torch.randn((576, 576), generator=torch.Generator().manual_seed(3)) * 0.02
    ours = nf4.dequantize(nf4.quantize(w, double_quant=True), w.shape).view(w.shape)
    theirs = bnb.dequantize_4bit(*bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True))
    ours_err, theirs_err = (ours - w).abs().mean(), (theirs - w).abs().mean()
    assert ours_err <= 1.005 * theirs_err, (ours_err, theirs_err)
