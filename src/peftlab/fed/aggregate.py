"""Aggregating client adapters: pure functions over ``dict[str, Tensor]`` adapter states.

Per-factor FedAvg (:func:`weighted_mean`) averages every tensor on its own. For IA3 that is the
average of the clients' ΔW, since ΔW is linear in the trained vectors; for factorised adapters it
is not: with LoRA, ΔW_i = s · B_i A_i, and

    Σ p_i B_i A_i  ≠  (Σ p_i B_i) (Σ p_i A_i)

(the right side carries cross terms B_i A_j). Two exact alternatives for LoRA, both starting from
the rank-sum stack (:func:`stack_lora`): the concatenation B = [p_1 B_1 | ... | p_n B_n],
A = [A_1; ...; A_n] has B A = Σ p_i B_i A_i exactly, at rank Σ r_i.

* :func:`svd_lora` truncates the stacked product back to rank r with a truncated SVD,
  B = U_r √S_r, A = √S_r V_rᵀ: the best rank-r approximation of the mean ΔW (Eckart–Young), exact
  whenever the mean has rank ≤ r. It never forms the d_out × d_in product: QR of both stacked
  factors reduces the SVD to one (Σ r_i × Σ r_i) matrix.
* :func:`stack_lora` itself keeps every direction; the rank grows with the number of clients.
  Over several rounds that is FLoRA (:func:`stack_onto`): clients keep the stacked global adapter
  frozen and train fresh directions on top; the server stacks those onto it.

LoHa (FedPara) has no such closed form: a Hadamard product of two rank-r products cannot hold a
general average, so it is averaged per factor, as in the FedPara paper. Tensors other than LoRA
factors (classification heads kept whole by ``modules_to_save``) are averaged as they are, which
is exact for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# Local keys of LoRA's A and B (peftlab uses Hugging Face PEFT's names), for linear layers and embeddings.
LORA_FACTOR_KEYS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
_DORA_KEY = "lora_magnitude_vector"

State = Mapping[str, torch.Tensor]


def normalise(weights: Sequence[float]) -> list[float]:
    """Weights (e.g. examples per client) → shares p_i summing to 1."""
    total = float(sum(weights))
    if not weights or any(w < 0 for w in weights) or total <= 0:
        raise ValueError(f"aggregation weights must be >= 0 with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def _check_same_keys(states: Sequence[State]) -> None:
    if not states:
        raise ValueError("nothing to aggregate: no client states")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            diff = sorted(set(s) ^ keys)
            raise ValueError(f"client state {i} has other tensors than client state 0 (differing keys: {diff[:3]}); "
                             f"every client must train the same adapter")


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ p_i · state_i per tensor (FedAvg), in float64 then cast back to the first state's dtypes."""
    _check_same_keys(states)
    shares = normalise(weights)
    return {key: sum(p * s[key].double() for p, s in zip(shares, states)).to(states[0][key].dtype)
            for key in states[0]}


def lora_modules(state: State) -> dict[str, tuple[str, str]]:
    """``{module path: (A key, B key)}`` for every LoRA factor pair in ``state``."""
    pairs = {}
    for key in state:
        for a_name, b_name in LORA_FACTOR_KEYS:
            if key.endswith("." + a_name):
                path = key[: -len(a_name) - 1]
                b_key = f"{path}.{b_name}"
                if b_key not in state:
                    raise ValueError(f"{key} has no matching {b_key}; is this a complete LoRA state?")
                pairs[path] = (key, b_key)
    return pairs


def _lora_pairs_or_fail(states: Sequence[State], what: str) -> dict[str, tuple[str, str]]:
    _check_same_keys(states)
    dora = [k for k in states[0] if k.endswith(_DORA_KEY)]
    if dora:
        raise ValueError(f"{what} aggregation is exact for plain LoRA; this state has DoRA magnitudes ({dora[0]}), "
                         f"whose normalisation is not linear in ΔW; use fedavg aggregation")
    pairs = lora_modules(states[0])
    if not pairs:
        raise ValueError(f"{what} aggregation needs LoRA factors (keys ending in lora_A.weight / lora_B.weight), "
                         f"and this state has none (first keys: {sorted(states[0])[:3]}); use fedavg aggregation")
    return pairs


def _others(states: Sequence[State], weights: Sequence[float],
            pairs: Mapping[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The weighted mean of every tensor that is not a LoRA factor (heads: exact as they are)."""
    factor_keys = {k for pair in pairs.values() for k in pair}
    rest = [{k: v for k, v in s.items() if k not in factor_keys} for s in states]
    return weighted_mean(rest, weights) if rest[0] else {}


def stack_lora(states: Sequence[State], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """Rank-sum stack of LoRA factors: B = [c_1 B_1 | ... | c_n B_n], A = [A_1; ...; A_n].

    Then B A = Σ c_i B_i A_i exactly, at rank Σ r_i. ``coefficients`` are used as given (not
    normalised): pass shares p_i for an average, or p_i · s_i / s for states trained with another
    scale s_i than the stacked adapter's s. Tensors that are not LoRA factors are averaged with the
    normalised coefficients.
    """
    pairs = _lora_pairs_or_fail(states, "rank-sum")
    if len(coefficients) != len(states):
        raise ValueError(f"{len(states)} states but {len(coefficients)} coefficients")
    out = _others(states, coefficients, pairs)
    for a_key, b_key in pairs.values():
        out[a_key] = torch.cat([s[a_key] for s in states], dim=0)  # (Σr, d_in)
        out[b_key] = torch.cat([c * s[b_key] for c, s in zip(coefficients, states)], dim=1)  # (d_out, Σr)
    return out


def truncate_lora(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of B A: (B', A', residual), B' = U√S, A' = √S Vᵀ.

    B (d_out, R), A (R, d_in). With B = Q_b R_b and Aᵀ = Q_a R_a (reduced QR), B A = Q_b (R_b R_aᵀ)
    Q_aᵀ, so the SVD of the small R × R core gives B A's. ``residual`` = ‖B A − B' A'‖_F / ‖B A‖_F
    (0 when B A is zero), computed from the discarded singular values. A rank above R (or the
    layer's width) is padded with zero columns/rows, which add nothing to the product.
    """
    dtype = A.dtype
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    k = min(rank, S.numel())
    total = float(S.square().sum())
    residual = float(S[k:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    root = S[:k].sqrt()
    B_new = (Qb @ U[:, :k]) * root  # (d_out, k)
    A_new = root[:, None] * (Vh[:k] @ Qa.T)  # (k, d_in)
    if k < rank:
        B_new = torch.cat([B_new, B_new.new_zeros(B_new.shape[0], rank - k)], dim=1)
        A_new = torch.cat([A_new, A_new.new_zeros(rank - k, A_new.shape[1])], dim=0)
    return B_new.to(dtype), A_new.to(dtype), residual


def svd_lora(states: Sequence[State], weights: Sequence[float],
             rank: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weighted mean of the clients' B_i A_i, re-factorised at ``rank`` by truncated SVD.

    Returns (state, residual per module path): the relative Frobenius error of the truncation,
    0 where the mean ΔW has rank ≤ ``rank``. The scale s = alpha / r is the same for every client,
    so averaging B_i A_i averages ΔW_i.
    """
    shares = normalise(weights)
    stacked = stack_lora(states, shares)
    out, residuals = dict(stacked), {}
    for path, (a_key, b_key) in lora_modules(stacked).items():
        out[b_key], out[a_key], residuals[path] = truncate_lora(stacked[b_key], stacked[a_key], rank)
    return out, residuals


def stack_onto(base: State, states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """One round of FLoRA: ``base``'s LoRA factors (frozen on the clients, coefficient 1) stacked with
    each client's fresh factors weighted by its share; the other tensors (heads, which the clients
    trained further from ``base``'s) are the clients' weighted mean.

    With client i's adapter base + (B_i, A_i), the result's B A is base's B A + Σ p_i B_i A_i: the
    exact mean of the clients' products, at rank R + Σ r_i.
    """
    shares = normalise(weights)
    out = stack_lora([base, *states], [1.0, *shares])
    out.update(_others(states, shares, lora_modules(base)))
    return out
