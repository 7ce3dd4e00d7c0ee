"""Aggregation against closed forms: FedAvg is the weighted mean per tensor; the exact LoRA options
give the weighted mean of the clients' ΔW (checked through the layers' own delta_weight)."""

import dataclasses

import pytest
import torch

from peftlab import LoraConfig, get_peft_model
from peftlab.fed.aggregate import lora_modules, stack_lora, stack_onto, svd_lora, truncate_lora, weighted_mean
from peftlab.fed.task import with_rank
from peftlab.models import tiny

WEIGHTS = [10, 30, 60]  # examples per client; shares 0.1, 0.3, 0.6
CONFIG = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)


def _client_states(config=CONFIG, n=3):
    """n random LoRA states of the same tiny BERT (B non-zero, so ΔW differs per client)."""
    states = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = get_peft_model(tiny("bert", "base", seed=0), config)
        states.append({k: v.detach().clone() for k, v in model.adapter_state_dict().items()})
    return states


def _deltas(state, config):
    """ΔW of every adapted layer, by the layers' own delta_weight."""
    model = get_peft_model(tiny("bert", "base", seed=0), config)
    model.load_adapter_state_dict("default", state)
    return {path: layer.delta_weight("default").detach().double() for path, layer in model.adapter_layers("default")}


def _mean_delta(states, config):
    per_client = [_deltas(s, config) for s in states]
    shares = [w / sum(WEIGHTS) for w in WEIGHTS]
    return {path: sum(p * d[path] for p, d in zip(shares, per_client)) for path in per_client[0]}


def test_weighted_mean_is_fedavg_by_hand():
    a, b = {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 6.0])}
    assert torch.equal(weighted_mean([a, b], [1, 3])["x"], torch.tensor([2.5, 5.0]))
    with pytest.raises(ValueError, match="other tensors"):
        weighted_mean([a, {"y": torch.zeros(2)}], [1, 1])


def test_per_factor_average_is_not_the_average_delta():
    states = _client_states()
    exact = _mean_delta(states, CONFIG)
    fedavg = _deltas(weighted_mean(states, WEIGHTS), CONFIG)
    gap = max(float((fedavg[p] - exact[p]).norm() / exact[p].norm()) for p in exact)
    assert gap > 0.1  # the cross terms B_i A_j are not small


def test_rank_sum_stack_is_exactly_the_mean_delta():
    states = _client_states()
    shares = [w / sum(WEIGHTS) for w in WEIGHTS]
    stacked = stack_lora(states, shares)
    wide = with_rank(CONFIG, 3 * CONFIG.r)  # same scale alpha / r at rank 12
    assert wide.scaling == CONFIG.scaling
    got, want = _deltas(stacked, wide), _mean_delta(states, CONFIG)
    for path in want:
        torch.testing.assert_close(got[path], want[path], rtol=1e-5, atol=1e-7)


def test_svd_is_exact_when_the_mean_fits_in_rank_r():
    # Clients sharing A (same seed for A, different B): Σ p_i B_i A = (Σ p_i B_i) A has rank <= r.
    states = _client_states()
    for s in states[1:]:
        for a_key, _ in lora_modules(s).values():
            s[a_key] = states[0][a_key].clone()
    merged, residuals = svd_lora(states, WEIGHTS, rank=CONFIG.r)
    assert max(residuals.values()) < 1e-6
    got, want = _deltas(merged, CONFIG), _mean_delta(states, CONFIG)
    for path in want:
        torch.testing.assert_close(got[path], want[path], rtol=1e-5, atol=1e-6)


def test_svd_truncation_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    B, A = torch.randn(20, 9, dtype=torch.float64), torch.randn(9, 15, dtype=torch.float64)
    B2, A2, residual = truncate_lora(B, A, rank=4)
    assert B2.shape == (20, 4) and A2.shape == (4, 15)
    M = B @ A
    U, S, Vh = torch.linalg.svd(M)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    torch.testing.assert_close(B2 @ A2, best)
    assert residual == pytest.approx(float((M - best).norm() / M.norm()))
    # The factors are balanced: B = U √S, A = √S Vᵀ.
    torch.testing.assert_close(B2.norm(dim=0), A2.norm(dim=1))
    # Asking for more rank than exists pads with zeros and is exact.
    B3, A3, r3 = truncate_lora(B, A, rank=12)
    assert B3.shape == (20, 12) and r3 == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(B3 @ A3, M)


def test_svd_of_several_clients_matches_truncating_the_exact_mean():
    states = _client_states()
    merged, residuals = svd_lora(states, WEIGHTS, rank=CONFIG.r)
    want = _mean_delta(states, CONFIG)
    got = _deltas(merged, CONFIG)
    for path, layer_want in want.items():
        S = torch.linalg.svdvals(layer_want)
        err = float((got[path] - layer_want).norm() / layer_want.norm())
        assert err == pytest.approx(float(S[CONFIG.r:].square().sum().sqrt() / S.square().sum().sqrt()), rel=1e-4)
    assert max(residuals.values()) == pytest.approx(max(
        float((got[p] - want[p]).norm() / want[p].norm()) for p in want), rel=1e-4)


def test_flora_round_stacks_fresh_directions_onto_the_frozen_global():
    base = _client_states(n=1)[0]
    fresh = _client_states(n=3)
    with_head = [{**s, "classifier.weight": torch.full((2, 3), float(i))} for i, s in enumerate(fresh)]
    out = stack_onto({**base, "classifier.weight": torch.zeros(2, 3)}, with_head, WEIGHTS)
    wide = with_rank(CONFIG, 4 * CONFIG.r)
    got = _deltas({k: v for k, v in out.items() if k != "classifier.weight"}, wide)
    base_delta, mean_fresh = _deltas(base, CONFIG), _mean_delta(fresh, CONFIG)
    for path in got:
        torch.testing.assert_close(got[path], base_delta[path] + mean_fresh[path], rtol=1e-5, atol=1e-7)
    # The head is the clients' weighted mean (they trained it further from the global one).
    torch.testing.assert_close(out["classifier.weight"], torch.full((2, 3), 0.1 * 0 + 0.3 * 1 + 0.6 * 2))


def test_exact_options_refuse_what_they_cannot_average():
    dora = _client_states(dataclasses.replace(CONFIG, use_dora=True), n=2)
    with pytest.raises(ValueError, match="DoRA"):
        svd_lora(dora, [1, 1], rank=4)
    with pytest.raises(ValueError, match="needs LoRA factors"):
        stack_lora([{"x": torch.zeros(1)}], [1.0])
