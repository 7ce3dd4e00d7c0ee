"""Chunked causal-LM cross-entropy against transformers' ForCausalLMLoss on the full logits."""

import pytest
import torch
import torch.nn as nn
from transformers.loss.loss_utils import ForCausalLMLoss

from peftlab.ops import causal_lm_loss

V, D = 97, 16  # a prime vocabulary, so no other dimension is mistaken for it


def _case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(D, V, bias=True).to(dtype)  # a head with a bias, trained here
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    hidden = (torch.randn(3, 8, D, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (3, 8), generator=g)
    labels[0, :5] = -100  # a prompt that is not scored
    labels[1, 3] = -100
    labels[2, -1] = -100  # the last position predicts nothing anyway
    return head, hidden, labels


def _grads(loss, head, hidden):
    return torch.autograd.grad(loss, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("num_items", [None, torch.tensor(29)])
@pytest.mark.parametrize("chunk_size", [1, 4, 4096])  # 4 does not divide the 15 labelled rows
def test_loss_and_gradients_match_transformers(num_items, chunk_size):
    head, hidden, labels = _case()
    ref = ForCausalLMLoss(head(hidden), labels, V, num_items_in_batch=num_items)
    got = causal_lm_loss(hidden, head, labels, num_items_in_batch=num_items, chunk_size=chunk_size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(_grads(got, head, hidden), _grads(ref, head, hidden)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_head_runs_on_labelled_rows_only_in_chunks():
    head, hidden, labels = _case()
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    causal_lm_loss(hidden, head, labels, chunk_size=4).backward()
    labelled = int((labels[:, 1:] != -100).sum())
    assert labelled == 15 and seen == [4, 4, 4, 3]  # once per chunk: no recomputation in backward


@pytest.mark.parametrize("num_items", [None, 5])
def test_no_labelled_position_is_what_transformers_returns(num_items):
    head, hidden, labels = _case()
    labels[:, 1:] = -100  # position 0's label is never predicted
    ref = ForCausalLMLoss(head(hidden), labels, V, num_items_in_batch=num_items)  # NaN for a mean of nothing
    got = causal_lm_loss(hidden, head, labels, num_items_in_batch=num_items)
    torch.testing.assert_close(got, ref, equal_nan=True)
    for g, r in zip(_grads(got, head, hidden), _grads(ref, head, hidden)):
        torch.testing.assert_close(g, r)  # zero, not NaN
        assert not g.any()


def test_bf16_hidden_accumulates_in_fp32():
    head, hidden, labels = _case(torch.bfloat16)
    ref = ForCausalLMLoss(head(hidden), labels, V)  # bf16 logits, upcast to fp32 before the loss
    got = causal_lm_loss(hidden, head, labels, chunk_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the same bf16 logits, fp32 sums
    for g, r in zip(_grads(got, head, hidden), _grads(ref, head, hidden)):
        assert g.dtype == r.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-3)


def test_nothing_of_vocabulary_width_is_saved_for_backward():
    head, hidden, labels = _case()
    params = {p.data_ptr() for p in head.parameters()}

    def saved_shapes(fn):
        shapes = []

        def pack(t):
            if t.data_ptr() not in params:  # the head's own weight is kept by any path
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return shapes

    standard = saved_shapes(lambda: ForCausalLMLoss(head(hidden), labels, V))
    assert any(V in s for s in standard)  # the check can fail: the full path keeps (B, T, V) logits
    lean = saved_shapes(lambda: causal_lm_loss(hidden, head, labels, chunk_size=4))
    assert lean and not any(V in s for s in lean), lean


def test_no_grad_makes_no_gradients():
    head, hidden, labels = _case()
    calls = []
    head.register_full_backward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        loss = causal_lm_loss(hidden, head, labels)
    assert not loss.requires_grad and not calls
    torch.testing.assert_close(loss, ForCausalLMLoss(head(hidden), labels, V).detach())


def test_bad_arguments_are_named():
    head, hidden, labels = _case()
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        causal_lm_loss(hidden, head, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels \(B, T\)"):
        causal_lm_loss(hidden, head, labels[:, :4])


def test_the_default_chunk_is_the_devices():
    from peftlab.ops.loss import DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE_GPU, default_chunk_size

    assert default_chunk_size(torch.device("cpu")) == DEFAULT_CHUNK_SIZE == 256
    assert default_chunk_size(torch.device("cuda", 0)) == DEFAULT_CHUNK_SIZE_GPU == 4096
    # 600 labelled rows on the CPU: chunk_size=None calls the head for 256, 256 and 88 rows.
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(D, V)
    sizes = []
    head.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    hidden = torch.randn(4, 151, D, generator=g)
    labels = torch.randint(0, V, (4, 151), generator=g)
    loss = causal_lm_loss(hidden, head, labels)
    assert sizes == [256, 256, 88]
    torch.testing.assert_close(loss, ForCausalLMLoss(head(hidden), labels, V).detach())
