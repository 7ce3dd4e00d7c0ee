"""Per-row low-rank updates for mixed batches: row b of a batch adds s_k · B_k A_k x for its own
adapter k = idx[b].

Stacked layout (:func:`stack_low_rank`): ``A`` (S, r, d_in) and ``B`` (S, r, d_out), slot k holding
adapter k's A and its scaled, transposed s_k · B_kᵀ; ranks are zero-padded to the largest r and the
last slot is all zeros (rows that use no adapter here point at it). Zeros add nothing, so one
code path serves every mix of ranks and ``__base__`` rows.

Three ways to compute the same sum, picked per call by :func:`choose_path`:

* ``"gathered"`` — each row's A and B are gathered (B_rows, r, d) and two ``bmm``s follow. Only the
  useful FLOPs, but a copy of r·(d_in + d_out) weights per row: cheap when rows are long
  (prefill), where T tokens share that copy — and for decode steps with at most two rows per
  adapter, which keep their rows' copies from one step to the next (the route's index tensor
  is the same object all through a ``generate``), so a step is two kernels and no copy.
* ``"masked"`` — one matmul against every real slot's A at once, (N, (S−1)·r); the columns of
  other slots are zeroed; one matmul against every slot's B. Each adapter's weights are read once,
  nothing is copied, but the FLOPs are S−1 times the useful ones: decode steps with many rows over
  few adapters.
* ``"grouped"`` — tokens sorted by slot, ``torch.nn.functional.grouped_mm`` once per factor, results
  added back with ``index_add_``: no weight copies and no wasted FLOPs, at the price of copying the
  activations in and out — decode steps with many rows and many adapters. CPU only: CUDA's kernel
  wants bf16 with 16-byte aligned strides and has not been verified here.

No path loops over adapters or rows in Python. Inputs that are token ids (LoRA on an embedding)
take the gathered path with a row lookup in each row's Aᵀ.

Measured on this project's CPU (1 thread; d_in 576, d_out 1536, r 8; time added to the base
``F.linear``'s, µs, hot caches, gathered without kept copies; rows × tokens / adapters):

    rows×T / n     base   gathered  masked  grouped
    4×1 / 3         231        73      54      116
    32×1 / 8        902       317     239      336
    64×1 / 4       1466       493     274      348
    16×1 / 16       500       153     229      261
    32×1 / 32       919       339     737      551
    64×1 / 64      1582       852    2081      945
    128×1 / 32     2910      1484    2431      904
    256×1 / 64     6252      2829    8479     1628
    4×16 / 3       1535       190     166      273
    16×16 / 16     5860       694    2135     1663
    16×128 / 16   55392     noise    9282    10019

Decode 4×1 / 3 through 70 different layers of SmolLM2's shapes (cold caches, as in a model): base
263 µs per layer, + 20 with kept copies, + 48 masked, + 41 to 64 gathered with copies.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# Rows shorter than this are decode steps: the same rows come back next step.
GATHER_MIN_TOKENS = 4
# Decode steps with at most this many rows per adapter keep their rows' gathered weights between
# steps (at most this many times the stack's memory): two kernels per step, no copies.
ROWS_PER_ADAPTER_CACHED = 2
# Masked wins while tokens_per_row · (slots − 1) stays at or below this (few wasted FLOPs).
MASKED_MAX_WORK = 8
# Grouping pays for its sort and copies from this many tokens on (decode steps only: longer rows
# share the gathered path's weight copy among their tokens).
GROUPED_MIN_TOKENS = 128
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")  # torch >= 2.8


class LowRankStack:
    """Adapters stacked into slots: ``A`` (S, r, d_in) and ``B`` (S, r, d_out) = scale · Bᵀ, the last
    slot zeros. ``A_real`` ((S−1)·r, d_in) and ``B_real`` ((S−1)·r, d_out) are the same tensors
    without the zero slot, flattened (views), for the masked path.

    Also remembers, for the last slot index tensor it served, what the masked and grouped paths
    derive from it: a decode step's layers all reuse one index tensor (:meth:`Route.index
    <peftlab.routing.Route.index>` caches it), so that work is done once per layer per generation
    instead of once per token."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.A, self.B = A, B
        self.slots, self.rank, self.d_in = A.shape
        self.d_out = B.shape[-1]
        self.A_real = A[:-1].reshape(-1, A.shape[-1])
        self.B_real = B[:-1].reshape(-1, B.shape[-1])
        # grouped_mm's kernels want every row stride a multiple of 16 bytes (r, d_in, d_out).
        self.aligned = all(n * A.element_size() % 16 == 0 for n in (A.shape[1], A.shape[2], B.shape[2]))
        self._derived: dict[tuple, tuple[torch.Tensor, object]] = {}
        # (idx, x.shape, each row's Aᵀ, each row's B) of the last in-place decode step: the next
        # step with the same rows skips straight to its two kernels (see low_rank_rows)
        self.decode_step: tuple | None = None

    def derived(self, what: str, idx: torch.Tensor, tokens: int, make):
        """``make()``'s value for (what, idx, tokens), kept while ``idx`` is the tensor last seen."""
        key = (what, tokens)
        hit = self._derived.get(key)
        if hit is not None and hit[0] is idx:
            return hit[1]
        value = make()
        self._derived[key] = (idx, value)  # holding idx keeps its id from being reused
        return value


class FusedDown:
    """Several stacks over the same slots (one route), their A's side by side for one down-projection:
    ``A`` (S, Σr, d_in) for the gathered path and ``A_real`` (Σ(S−1)·r, d_in), each stack's masked
    block in turn. ``widths[path]`` says how :func:`shared_down`'s product splits among the stacks."""

    def __init__(self, stacks: Sequence[LowRankStack]) -> None:
        self.stacks = tuple(stacks)
        self.A = torch.cat([s.A for s in stacks], dim=1)
        self.A_real = torch.cat([s.A_real for s in stacks])
        self.slots, self.d_in = stacks[0].slots, stacks[0].d_in
        self.widths = {"gathered": [s.rank for s in stacks], "masked": [s.A_real.shape[0] for s in stacks]}


def stack_low_rank(adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None]) -> LowRankStack:
    """Stack adapters into slots: ``adapters[k]`` is (A (r_k, d_in), B (d_out, r_k), scale) — the
    ``nn.Linear`` layout — or None for a slot that adds nothing. The result has
    S = len(adapters) + 1 slots (the last one zeros) of rank r = max r_k. Differentiable:
    gradients reach every A and B."""
    present = [a for a in adapters if a is not None]
    if not present:
        raise ValueError("stack_low_rank needs at least one adapter; got only empty slots")
    ref_a, ref_b, _ = present[0]
    r = max(a.shape[0] for a, _, _ in present)
    zero_a = ref_a.new_zeros(r, ref_a.shape[1])
    zero_b = ref_b.new_zeros(r, ref_b.shape[0])
    As, Bs = [], []
    for item in adapters:
        if item is None:
            As.append(zero_a)
            Bs.append(zero_b)
            continue
        a, b, scale = item
        pad = (0, 0, 0, r - a.shape[0])  # zero rows of A and of Bᵀ: the padded rank adds nothing
        As.append(F.pad(a, pad))
        Bs.append(F.pad(b.T * scale, pad))
    return LowRankStack(torch.stack(As + [zero_a]), torch.stack(Bs + [zero_b]))


def choose_path(rows: int, tokens_per_row: int, slots: int) -> str:
    """"masked", "gathered" or "grouped" for ``rows`` rows of ``tokens_per_row`` tokens over
    ``slots`` stacked slots (the zero slot included); see the module docstring for the numbers.
    Where ``grouped_mm`` cannot run, :func:`low_rank_rows` takes "gathered" instead of "grouped"."""
    decode = tokens_per_row < GATHER_MIN_TOKENS
    if decode and rows <= ROWS_PER_ADAPTER_CACHED * (slots - 1):
        return "gathered"  # with the rows' weights cached across steps
    if tokens_per_row * (slots - 1) <= MASKED_MAX_WORK:
        return "masked"
    if decode and rows * tokens_per_row >= GROUPED_MIN_TOKENS:
        return "grouped"
    return "gathered"


def low_rank_rows(x: torch.Tensor, stack: LowRankStack, idx: torch.Tensor, *,
                  out: torch.Tensor | None = None, path: str | None = None) -> torch.Tensor:
    """Per row: ``out[b] + x[b] @ A[idx[b]]ᵀ @ B[idx[b]]`` (or just the update without ``out``).

    x: (B_rows, ..., d_in) activations, or (B_rows, T) token ids (then A is (S, r, vocab) and
    ``x[b, t]`` picks a column of A); ``stack`` from :func:`stack_low_rank`; idx (B_rows,) slots.
    ``out`` (B_rows, ..., d_out) is accumulated into in place when no gradient is needed and dtypes
    agree — pass a tensor nobody else reads (a layer's fresh output). Returns the result, in B's
    dtype when ``out`` is None, else in ``out``'s. ``path`` forces one route (tests); by default
    :func:`choose_path` picks.
    """
    step = stack.decode_step
    if (step is not None and step[0] is idx and out is not None and path is None and x.shape == step[1]
            and out.dtype == x.dtype == step[3].dtype and not torch.is_grad_enabled() and out.is_contiguous()
            and not torch.is_autocast_enabled("cpu" if out.is_cpu else out.device.type)):
        # the next decode step of the same rows: two kernels, none of the choosing below
        return out.baddbmm_(torch.bmm(x, step[2]), step[3])
    A, B = stack.A, stack.B
    S, r, d_in, d_out = stack.slots, stack.rank, stack.d_in, stack.d_out
    rows = x.shape[0]
    if not x.is_floating_point():  # token ids
        if path not in (None, "gathered"):
            raise ValueError(f"low_rank_rows: token ids (an embedding's LoRA) take the 'gathered' path, not {path!r}")
        return _gathered_ids(x, stack, idx, out)
    if x.dtype != A.dtype:
        x = x.to(A.dtype)
    tokens = x.numel() // (rows * d_in) if rows else 0
    if path is None:
        path = choose_path(rows, tokens, S)
        if path == "grouped" and not _grouped_ok(x, stack):
            path = "gathered"
    elif path == "grouped" and not _grouped_ok(x, stack):
        raise ValueError(f"low_rank_rows: the grouped path needs a CPU, torch.nn.functional.grouped_mm, no "
                         f"autograd and dims whose rows are multiples of 16 bytes; got r={r}, "
                         f"d_in={d_in}, d_out={d_out}, {A.dtype} on {x.device}")
    inplace = out is not None and _can_accumulate(out, x, A, B)

    if path in ("gathered", "masked"):
        if path == "gathered" and tokens < GATHER_MIN_TOKENS and rows <= ROWS_PER_ADAPTER_CACHED * (S - 1):
            Ag, Bg = stack.derived("rows", idx, 0, lambda: _gather_rows(stack, idx))  # kept across decode steps
            if inplace and x.dim() == 3:
                stack.decode_step = (idx, x.shape, Ag, Bg)
            h = torch.bmm(x.reshape(rows, -1, d_in), Ag)  # (B_rows, T, r)
        else:
            h = _down(x.reshape(rows, -1, d_in), stack, idx, path)
        return up_rows(h.view(x.shape[:-1] + (-1,)), path, stack, idx, out=out)
    if path == "grouped":
        order, offs = stack.derived("groups", idx, tokens, lambda: _token_groups(idx, tokens, S))
        h = F.grouped_mm(x.reshape(-1, d_in)[order], A.transpose(1, 2), offs=offs)  # (N, r), by slot
        o = F.grouped_mm(h, B, offs=offs)  # (N, d_out)
        if inplace:
            out.view(-1, d_out).index_add_(0, order, o)
            return out
        delta = torch.empty_like(o).index_copy_(0, order, o)
    else:
        raise ValueError(f"low_rank_rows: unknown path {path!r}; use 'gathered', 'masked' or 'grouped'")
    delta = delta.view(x.shape[:-1] + (d_out,))
    return delta if out is None else out + delta.to(out.dtype)


def shared_down(x: torch.Tensor, fused: FusedDown, idx: torch.Tensor) -> tuple[str, tuple[torch.Tensor, ...]] | None:
    """Every stack's down-projection of ``x`` (B_rows, ..., d_in) with one matmul: the path and one
    product per stack of ``fused``, each to finish with :func:`up_rows` (its own stack, same idx).

    None where sharing does not pay: where :func:`choose_path` picks "grouped" (sorted tokens), and
    for decode steps that keep their rows' weights, where each layer's own step is two kernels
    and handing products over costs more Python than the one saved kernel (measured, CPU:
    q/k/v of SmolLM2's shapes, 4 rows over 3 adapters: ~15 µs slower shared)."""
    rows, d_in = x.shape[0], fused.d_in
    tokens = x.numel() // (rows * d_in) if rows else 0
    path = choose_path(rows, tokens, fused.slots)
    if path == "grouped" or (path == "gathered" and tokens < GATHER_MIN_TOKENS):
        return None
    if x.dtype != fused.A.dtype:
        x = x.to(fused.A.dtype)
    h = _down(x.reshape(rows, -1, d_in), fused, idx, path)
    return path, h.view(x.shape[:-1] + (-1,)).split(fused.widths[path], dim=-1)


def _down(x: torch.Tensor, stack: LowRankStack | FusedDown, idx: torch.Tensor, path: str) -> torch.Tensor:
    """x (B_rows, T, d_in) → (B_rows, T, width): gathered, each row's slot of A; masked, every real
    slot (the caller zeroes other slots' columns)."""
    if path == "gathered":
        return torch.bmm(x, stack.A.index_select(0, idx).transpose(1, 2))
    return F.linear(x, stack.A_real)


def up_rows(h: torch.Tensor, path: str, stack: LowRankStack, idx: torch.Tensor, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """The second half of :func:`low_rank_rows`: h (B_rows, ..., width) from the down-projection on
    ``path`` ("gathered": (…, r); "masked": (…, (S−1)·r), every slot) times each row's B, into
    ``out`` in place when allowed, else a new tensor."""
    rows, d_out, S = h.shape[0], stack.d_out, stack.slots
    h3 = h.reshape(rows, -1, h.shape[-1])  # (B_rows, T, width)
    inplace = out is not None and _can_accumulate(out, h, stack.B)
    if path == "gathered":
        if h3.shape[1] < GATHER_MIN_TOKENS and rows <= ROWS_PER_ADAPTER_CACHED * (S - 1):
            Bg = stack.derived("rows", idx, 0, lambda: _gather_rows(stack, idx))[1]  # kept across decode steps
        else:
            Bg = stack.B.index_select(0, idx)
        if inplace:
            out.view(rows, -1, d_out).baddbmm_(h3, Bg)
            return out
        delta = torch.bmm(h3, Bg)
    else:
        # every slot's columns, zeroed but the row's own: (B_rows, 1, (S−1)·r)
        mask = stack.derived("mask", idx, 0, lambda: _slot_mask(idx, S - 1, stack.rank, stack.A.dtype))
        hm = (h3 * mask).view(-1, stack.A_real.shape[0])
        if inplace:
            out.view(-1, d_out).addmm_(hm, stack.B_real)
            return out
        delta = hm @ stack.B_real
    delta = delta.view(h.shape[:-1] + (d_out,))
    return delta if out is None else out + delta.to(out.dtype)


def _gather_rows(stack: LowRankStack, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's Aᵀ (B_rows, d_in, r) and B (B_rows, r, d_out): copies made by ``index_select``,
    several times faster than ``A[idx]`` here."""
    return stack.A.index_select(0, idx).transpose(1, 2), stack.B.index_select(0, idx)


def _gathered_ids(ids: torch.Tensor, stack: LowRankStack, idx: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The gathered path for token ids (B_rows, T): a row lookup in each row's Aᵀ, (S, vocab, r)."""
    h = stack.A.transpose(1, 2)[idx[:, None], ids.reshape(ids.shape[0], -1)]  # (B_rows, T, r)
    Bg = stack.B.index_select(0, idx)  # (B_rows, r, d_out)
    if out is not None and _can_accumulate(out, stack.A, stack.B):
        out.view(ids.shape[0], -1, Bg.shape[-1]).baddbmm_(h, Bg)
        return out
    delta = torch.bmm(h, Bg).view(ids.shape + (Bg.shape[-1],))
    return delta if out is None else out + delta.to(out.dtype)


def add_low_rank(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``out + scale · (x @ Aᵀ) @ Bᵀ`` for one adapter on every row: A (r, d_in), B (d_out, r),
    x (..., d_in), out (..., d_out). One ``addmm`` instead of matmul, scale and add: in place into
    ``out`` when no gradient is needed (no temporaries the size of the output), else one new tensor."""
    if x.dtype != A.dtype:
        x = x.to(A.dtype)
    return add_up(out, F.linear(x, A), B, scale)


class LoraLinear(torch.autograd.Function):
    """x Wᵀ + b + s · (x Aᵀ) Bᵀ for a frozen dense base (W, b) and one LoRA adapter, as one autograd
    node. Forward: the base GEMM, then the adapter added into its output in place (``addmm_``).
    Backward: with u = s · g B (N, r), the input gradient g W + u A is one tensor (``addmm_`` into
    the base's), not two that autograd adds; dA = uᵀ x, dB = s · gᵀ (x Aᵀ). Against base and adapter
    as separate nodes that saves one pass over the (N, d_in) gradient and about half the kernels and
    autograd nodes per layer, which is what bounds a small model's step on a GPU. x is (N, d_in).

    A and B may be fp32 on a half-precision base (``autocast_adapter_dtype``): they are cast down
    to x's dtype for the GEMMs (a copy of r·(d_in + d_out) weights, not of the activations) and
    their gradients come back in their own dtype. No autocast, and W, b frozen: the caller checks
    (``AdapterLayer._runs_inside_base``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale: float):
        Ac, Bc = A.to(x.dtype), B.to(x.dtype)  # no-ops unless the adapter keeps fp32 weights
        out = F.linear(x, weight, bias)  # (N, d_out)
        h = x @ Ac.T  # (N, r)
        out.addmm_(h, Bc.T, alpha=scale)
        ctx.save_for_backward(x, h, weight, Ac, Bc)
        ctx.scale, ctx.dtypes = scale, (A.dtype, B.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, h, weight, A, B = ctx.saved_tensors
        u = (g @ B).mul_(ctx.scale)  # (N, r)
        dA = (u.T @ x).to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
        dB = (g.T @ h).mul_(ctx.scale).to(ctx.dtypes[1]) if ctx.needs_input_grad[4] else None
        dx = (g @ weight).addmm_(u, A) if ctx.needs_input_grad[0] else None
        return dx, None, None, dA, dB, None


def add_up(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``out + scale · h @ Bᵀ`` with h = x Aᵀ (..., r) already computed (by a sibling, see
    :mod:`.fuse`): the second half of :func:`add_low_rank`."""
    h = h.reshape(-1, h.shape[-1])  # (N, r)
    if _can_accumulate(out, h, B):
        out.view(-1, out.shape[-1]).addmm_(h, B.T, alpha=scale)
        return out
    if out.dtype != B.dtype:
        return out + (h @ B.T * scale).view(out.shape).to(out.dtype)
    return torch.addmm(out.reshape(-1, out.shape[-1]), h, B.T, alpha=scale).view(out.shape)


def _grouped_ok(x: torch.Tensor, stack: LowRankStack) -> bool:
    """``grouped_mm`` runs here: on CPU (see the module docstring), without autograd (its CPU
    backward refuses expanded gradients), with 16-byte aligned row strides."""
    return x.is_cpu and _HAS_GROUPED_MM and stack.aligned and not _needs_grad(x, stack.A, stack.B)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _can_accumulate(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """In-place accumulation is safe without autograd, with one dtype and no autocast (which would
    hand the in-place kernel mixed dtypes)."""
    return (out.dtype == inputs[-1].dtype and not _needs_grad(out, *inputs) and out.is_contiguous()
            and not torch.is_autocast_enabled("cpu" if out.is_cpu else out.device.type))


def _slot_mask(idx: torch.Tensor, slots: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """(B_rows, 1, slots·r): ones on the r columns of each row's slot; rows past the last slot get none."""
    col_slot = torch.arange(slots * r, device=idx.device) // r
    return (col_slot[None, None, :] == idx[:, None, None]).to(dtype)


def _token_groups(idx: torch.Tensor, tokens: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order grouped by slot (stable), and each group's end offset (int32, ``grouped_mm``'s)."""
    token_slot = idx.repeat_interleave(tokens)  # (N,)
    order = torch.argsort(token_slot, stable=True)
    offs = torch.cumsum(torch.bincount(token_slot, minlength=slots), 0).to(torch.int32)
    return order, offs
