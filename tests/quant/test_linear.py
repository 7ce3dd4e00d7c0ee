"""QuantLinear: forward = F.linear with the dequantised weight, gradients to the input only, the
weight held in buffers, and the dequantize / quantize_like protocol merging uses."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from peftlab.quant import QuantLinear


def linear(d_in=100, d_out=37, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("chunk_rows", [None, 7])  # 7 rows = 700 values: chunks cross NF4 blocks
def test_forward_and_input_gradient_match_f_linear_on_the_dequantised_weight(scheme, chunk_rows):
    q = QuantLinear.from_linear(linear(), scheme, chunk_rows=chunk_rows)
    W, b = q.weight, q.bias.detach()
    x = torch.randn(2, 5, 100, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = q(x), F.linear(x_ref, W, b)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    assert q.bias.grad is None


def test_weight_lives_in_buffers_and_is_close_to_the_original():
    lin = linear()
    q = QuantLinear.from_linear(lin, "nf4")
    assert isinstance(q, nn.Linear)  # found by target_modules and "all-linear" like any linear layer
    assert [n for n, _ in q.named_parameters()] == ["bias"] and not q.bias.requires_grad
    assert {n: t.dtype for n, t in q.named_buffers()} == {
        "codes": torch.uint8, "code": torch.float32, "absmax_q": torch.int8,
        "absmax_scale": torch.float32, "absmax_mean": torch.float32}
    assert q.weight.shape == (37, 100) and (q.weight - lin.weight).abs().max() < 0.16 * lin.weight.abs().max()  # NF4: ≤ 0.152 · absmax
    assert torch.equal(q.bias, lin.bias)


def test_dequantize_gives_a_frozen_dense_copy_and_quantize_like_repeats_the_options():
    q = QuantLinear.from_linear(linear(), "nf4", block_size=32, double_quant=False, chunk_rows=5)
    dense = q.dequantize()
    assert type(dense) is nn.Linear and not any(p.requires_grad for p in dense.parameters())
    assert torch.equal(dense.weight, q.weight) and torch.equal(dense.bias, q.bias)
    again = q.quantize_like(linear(seed=1))
    assert (again.scheme, again.options, again.chunk_rows) == ("nf4", {"block_size": 32, "double_quant": False}, 5)
    assert again.absmax.shape == (3700 // 32 + 1,)


def test_no_bias_and_bfloat16():
    q = QuantLinear.from_linear(linear(bias=False).to(torch.bfloat16), "int8")
    assert q.bias is None and q.weight.dtype == torch.bfloat16
    x = torch.randn(3, 100, dtype=torch.bfloat16)
    torch.testing.assert_close(q(x), x @ q.weight.T)


def test_nbytes_closed_form():
    q = QuantLinear.from_linear(linear(576, 1536, bias=False), "nf4")
    n = 576 * 1536
    # codes n/2, int8 scales n/64, fp32 second-level scales per 256 blocks, mean, 16 fp32 levels
    assert q.quantized_nbytes() == n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 4 + 64
    assert QuantLinear.from_linear(linear(576, 1536, bias=False), "int8").quantized_nbytes() == n + 4 * 1536


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="unknown quantisation scheme 'fp8'"):
        QuantLinear.from_linear(linear(), "fp8")
    with pytest.raises(ValueError, match=r"int8 quantisation takes options none, got \['block_size'\]"):
        QuantLinear.from_linear(linear(), "int8", block_size=32)
    with pytest.raises(ValueError, match="chunk_rows must be a positive"):
        QuantLinear.from_linear(linear(), "nf4", chunk_rows=0)
