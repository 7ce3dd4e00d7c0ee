"""Per-row low-rank kernels against a Python loop over rows: Σ_b s_k · B_k A_k x_b, k = idx[b]."""

import pytest
import torch
import torch.nn.functional as F

from peftlab.ops import add_low_rank, choose_path, low_rank_rows, stack_low_rank

D_IN, D_OUT = 8, 12  # multiples of 4 floats: grouped_mm wants 16-byte row strides
PATHS = ["gathered", "masked"] + (["grouped"] if hasattr(F, "grouped_mm") else [])


def adapters(ranks=(2, 4, None, 1), seed=0):
    """Adapters of different ranks (None: a name without tensors on this layer), requiring grad."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        if r is None:
            out.append(None)
            continue
        A = torch.randn(r, D_IN, generator=g).requires_grad_()
        B = torch.randn(D_OUT, r, generator=g).requires_grad_()
        out.append((A, B, 0.5 + i))
    return out


def reference(x, ads, idx):
    """The loop the kernels must equal; slot len(ads) (and None slots) add nothing."""
    rows = []
    for b, k in enumerate(idx.tolist()):
        if k < len(ads) and ads[k] is not None:
            A, B, s = ads[k]
            rows.append(s * (x[b] @ A.T) @ B.T)
        else:
            rows.append(x[b].new_zeros(x[b].shape[:-1] + (D_OUT,)))
    return torch.stack(rows)


# rows 0..5: every slot incl. the empty name (2) and the __base__ slot (4), one adapter twice
IDX = torch.tensor([3, 0, 4, 1, 2, 0])


def test_stack_pads_ranks_scales_b_and_ends_with_a_zero_slot():
    ads = adapters()
    stack = stack_low_rank(ads)
    A, B = stack.A, stack.B
    assert A.shape == (5, 4, D_IN) and B.shape == (5, 4, D_OUT)
    a0, b0, s0 = ads[0]
    torch.testing.assert_close(A[0, :2], a0)
    torch.testing.assert_close(B[0, :2], s0 * b0.T)
    assert not A[0, 2:].any() and not B[0, 2:].any()  # padded rank
    assert not A[2].any() and not A[4].any() and not B[2].any() and not B[4].any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(6, 4, D_IN), (6, D_IN), (6, 2, 3, D_IN)], ids=["BTd", "Bd", "BT1T2d"])
def test_paths_equal_the_loop(path, shape):
    ads = adapters()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    stack = stack_low_rank(ads)
    with torch.no_grad():
        expected = reference(x, ads, IDX)
        torch.testing.assert_close(low_rank_rows(x, stack, IDX, path=path), expected, atol=1e-5, rtol=1e-5)
        base = torch.randn(shape[:-1] + (D_OUT,))
        out = base.clone()
        got = low_rank_rows(x, stack, IDX, out=out, path=path)
        assert got is out  # accumulated in place: no output-sized temporaries
        torch.testing.assert_close(got, base + expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["gathered", "masked"])
def test_gradients_equal_the_loop(path):
    """Training uses gathered or masked (never grouped, never in place): gradients reach x, every
    A and B, and the layer output ``out``."""
    ads = adapters()
    x = torch.randn(6, 4, D_IN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = torch.randn(6, 4, D_OUT, requires_grad=True)
    weight = torch.randn(6, 4, D_OUT)
    tensors = [x, out] + [t for a in ads if a is not None for t in a[:2]]

    stack = stack_low_rank(ads)
    got = low_rank_rows(x, stack, IDX, out=out, path=path)
    assert got is not out
    grads = torch.autograd.grad((got * weight).sum(), tensors)
    expected = torch.autograd.grad(((out + reference(x, ads, IDX)) * weight).sum(), tensors)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_token_ids_look_up_columns_of_each_rows_a():
    """LoRA on an embedding: A is (r, vocab) and x holds token ids."""
    g = torch.Generator().manual_seed(2)
    vocab = 11
    ads = [(torch.randn(2, vocab, generator=g), torch.randn(D_OUT, 2, generator=g), 2.0),
           (torch.randn(4, vocab, generator=g), torch.randn(D_OUT, 4, generator=g), 0.5)]
    ids = torch.randint(0, vocab, (3, 7), generator=g)
    idx = torch.tensor([1, 2, 0])
    stack = stack_low_rank(ads)
    expected = torch.stack([ads[k][2] * ads[k][0][:, ids[b]].T @ ads[k][1].T if k < 2 else torch.zeros(7, D_OUT)
                            for b, k in enumerate(idx.tolist())])
    torch.testing.assert_close(low_rank_rows(ids, stack, idx), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gathered"):
        low_rank_rows(ids, stack, idx, path="masked")


def test_decode_steps_reuse_their_rows_gathered_weights():
    """Few rows per adapter, one token each: each row's A and B are copied on the first step only,
    and later in-place steps with the same rows go straight to two kernels."""
    ads = adapters()
    stack = stack_low_rank(ads)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for step in range(3):
            x, base = torch.randn(6, 1, D_IN, generator=g), torch.randn(6, 1, D_OUT, generator=g)
            got = low_rank_rows(x, stack, IDX, out=base.clone())
            torch.testing.assert_close(got, base + reference(x, ads, IDX), atol=1e-5, rtol=1e-5)
            if step == 0:
                rows = stack.derived("rows", IDX, 0, lambda: None)
                assert rows is not None and rows[1].shape == (6, 4, D_OUT)
                assert stack.decode_step[0] is IDX
        assert stack.derived("rows", IDX, 0, lambda: None) is rows
    x = torch.randn(6, 1, D_IN, requires_grad=True)  # with autograd: out of place, differentiable
    got = low_rank_rows(x, stack, IDX, out=torch.zeros(6, 1, D_OUT))
    assert got.grad_fn is not None
    torch.testing.assert_close(got, reference(x, ads, IDX), atol=1e-5, rtol=1e-5)


def test_masks_are_derived_once_per_index_tensor():
    """Decode steps reuse the route's index tensor: the mask is built on the first step only."""
    stack = stack_low_rank(adapters())
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        low_rank_rows(x, stack, IDX, path="masked")
        mask = stack.derived("mask", IDX, 0, lambda: None)
        assert mask is not None and mask.shape == (6, 1, 4 * 4)
        low_rank_rows(x, stack, IDX, path="masked")
        assert stack.derived("mask", IDX, 0, lambda: None) is mask
        other = IDX.clone()
        assert stack.derived("mask", other, 0, lambda: "rebuilt") == "rebuilt"


@pytest.mark.parametrize("rows, tokens, slots, expected", [
    (4, 1, 4, "gathered"),      # decode, ≤ 2 rows per adapter: rows' weights kept between steps
    (16, 1, 17, "gathered"),
    (64, 1, 5, "masked"),       # decode, many rows, few adapters: one matmul over all adapters
    (256, 1, 65, "grouped"),    # decode, many rows, many adapters: sort, grouped_mm
    (64, 1, 17, "gathered"),
    (16, 128, 17, "gathered"),  # prefill: each row's weight copy is shared by 128 tokens
    (4, 8, 2, "masked"),        # short rows, one adapter
])
def test_choose_path(rows, tokens, slots, expected):
    assert choose_path(rows, tokens, slots) == expected


@pytest.mark.skipif("grouped" not in PATHS, reason="torch without grouped_mm")
def test_grouped_refuses_unaligned_dims_and_the_default_avoids_it():
    ads = [(torch.randn(3, 6), torch.randn(5, 3), 1.0)] * 20  # r=3, d_in=6: 12- and 24-byte rows
    stack = stack_low_rank(ads)
    x = torch.randn(128, 6)
    idx = torch.arange(128) % 21
    with torch.no_grad():
        with pytest.raises(ValueError, match="16 bytes"):
            low_rank_rows(x, stack, idx, path="grouped")
        torch.testing.assert_close(low_rank_rows(x, stack, idx), low_rank_rows(x, stack, idx, path="gathered"))


@pytest.mark.skipif("grouped" not in PATHS, reason="torch without grouped_mm")
def test_default_path_groups_many_short_rows_but_never_under_autograd(monkeypatch):
    ads = adapters(ranks=(4,) * 20)
    stack = stack_low_rank(ads)
    x = torch.randn(128, D_IN, requires_grad=True)
    idx = torch.arange(128) % 21

    def grouped_mm_called(*args, **kwargs):
        raise AssertionError("grouped_mm called")

    monkeypatch.setattr(F, "grouped_mm", grouped_mm_called)
    got = low_rank_rows(x, stack, idx)  # autograd: gathered
    torch.testing.assert_close(got, reference(x, ads, idx), atol=1e-4, rtol=1e-4)
    with torch.no_grad(), pytest.raises(AssertionError, match="grouped_mm called"):
        low_rank_rows(x, stack, idx)  # 128 rows of 1 token over 21 slots: grouped


def test_add_low_rank_is_one_addmm_in_place_without_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, D_IN, generator=g)
    A = torch.randn(4, D_IN, generator=g, requires_grad=True)
    B = torch.randn(D_OUT, 4, generator=g, requires_grad=True)
    base = torch.randn(2, 3, D_OUT, generator=g)
    expected = base + 1.5 * (x @ A.T) @ B.T

    with torch.no_grad():
        out = base.clone()
        assert add_low_rank(out, x, A, B, 1.5) is out
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    got = add_low_rank(base.clone(), x, A, B, 1.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(got.sum(), (A, B))
    for g_, e in zip(grads, torch.autograd.grad(expected.sum(), (A, B))):
        torch.testing.assert_close(g_, e, atol=1e-5, rtol=1e-5)

    with torch.no_grad():  # a bf16 base output stays bf16 and is not written in place
        low = base.to(torch.bfloat16)
        got = add_low_rank(low, x, A, B, 1.5)
        assert got.dtype == torch.bfloat16 and got is not low
        torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.02)
