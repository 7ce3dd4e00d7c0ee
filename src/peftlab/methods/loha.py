"""LoHa: low-rank Hadamard product, from FedPara (Hyeon-Woo et al. 2022, https://arxiv.org/abs/2108.06098).

For a frozen weight W (d_out × d_in) the update is the element-wise product of two rank-r matrices

    ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r,     W1a, W2a: (d_out, r),  W1b, W2b: (r, d_in)

which has 2·r·(d_in + d_out) parameters, like LoRA of rank 2r, but rank up to r² instead of 2r.
At init W2b is zero (the others kaiming-uniform, as Hugging Face PEFT does), so ΔW = 0.

Two ways to apply it, picked per forward by a FLOP estimate (:func:`choose_forward_mode`):

* "materialize": build ΔW (d_out × d_in), then x ΔWᵀ — what Hugging Face PEFT always does;
* "factored": the face-splitting identity (W1a W1b) ⊙ (W2a W2b) = (W1a ⊙r W2a)(W1b ⊙c W2b), with
  ⊙r the row-wise Kronecker product ((d_out, r), (d_out, r) → (d_out, r²)) and ⊙c the column-wise
  one ((r, d_in), (r, d_in) → (r², d_in)), so ΔW x = U (V x) and no d_out × d_in matrix exists.
  It is cheaper when r² is small next to the layer's widths and the batch holds many tokens.
  V x itself does not factor further: it is vec(W1b diag(x) W2bᵀ), an r × r matrix of rank up to r,
  not the Kronecker product (W1b x) ⊗ (W2b x) (rank 1), so x Vᵀ (2·r²·d_in FLOPs a token) is the
  cheapest way in. The route's backward (:class:`FactoredDelta`) keeps only x and h = x Vᵀ (N × r²),
  rebuilds U and V, and maps dU, dV straight onto the four factors. On a plain frozen
  ``nn.Linear`` base, :class:`FactoredLinear` runs the base's GEMMs in the same function, so the
  input gradient is one tensor (g W + t V) instead of two that autograd adds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..config import AdapterConfig, ConfigError, HFMapping, register
from ..formats.hf_peft import target_fields_from_hf, target_fields_to_hf
from ..layers import AdapterLayer, linear_features
from ..routing import Route
from ..targeting import LINEAR_TYPES, TargetFields, find_targets, query_value_targets, unwrap

FORWARD_MODES = ("auto", "materialize", "factored")
_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True)
class LoHaConfig(TargetFields, AdapterConfig):
    """Configuration of a LoHa adapter."""

    method = "loha"

    r: int = 8
    """Rank of each of the two factors W1a W1b and W2a W2b; ΔW has rank up to r²."""
    alpha: float = 8
    """Scale numerator: ΔW is multiplied by alpha / r."""
    init_weights: bool = True
    """True: W1a, W1b, W2a kaiming-uniform and W2b zero, so ΔW = 0 at start. False: W2b random
    too (the adapter changes the output from the start — for tests)."""
    forward_mode: str = "auto"
    """How ΔW x is computed: "materialize" (build ΔW), "factored" (Khatri–Rao factors, no
    d_out × d_in matrix) or "auto" (the cheaper by a FLOP estimate, per layer and batch)."""

    def validate(self) -> None:
        self.validate_targets()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoHaConfig.r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoHaConfig.alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}")
        if self.forward_mode not in FORWARD_MODES:
            raise ConfigError(f"LoHaConfig.forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def row_khatri_rao(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Face-splitting product: (d, p), (d, q) → (d, p·q), row i = kron(a[i], b[i])."""
    return (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)


def col_khatri_rao(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Khatri–Rao product: (p, d), (q, d) → (p·q, d), column j = kron(a[:, j], b[:, j])."""
    return (a.unsqueeze(-2) * b.unsqueeze(-3)).flatten(-3, -2)


class FactoredDelta(torch.autograd.Function):
    """ΔW x on the factored route: x (N, d_in), W1a, W2a (d_out, r), W1b, W2b (r, d_in) → (N, d_out).

    Forward: h = s · x Vᵀ (N, r²), then h Uᵀ — added to ``base`` (the base layer's (N, d_out)
    output) in the same GEMM when given, one pass over the output instead of two. Backward, with
    g = ∂L/∂y (N, d_out) and t = s · g U (N, r²) = ∂L/∂(x Vᵀ):  dx = t V,  dU = gᵀ h (d_out, r²),
    dV = tᵀ x (r², d_in), and through U[i, (a, b)] = W1a[i, a] W2a[i, b], V[(a, b), j] = W1b[a, j] W2b[b, j]:
    dW1a[i, a] = Σ_b dU[i, a, b] W2a[i, b], dW2a[i, b] = Σ_a dU[i, a, b] W1a[i, a], and likewise for
    W1b, W2b with dV. Autograd through the plain expression does the same GEMMs but keeps U and V
    (d × r² each) alive until backward; here only x and h are kept (U, V cost d·r² to rebuild).
    """

    @staticmethod
    def forward(ctx, x, w1a, w1b, w2a, w2b, scaling: float, base=None):
        # Under autocast the GEMMs below run in the autocast dtype; backward must run the same way.
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        h = (x @ col_khatri_rao(w1b, w2b).T).mul_(scaling)  # (N, r²): scale the smallest tensor
        ctx.save_for_backward(x, h, w1a, w1b, w2a, w2b)
        ctx.scaling = scaling
        u = row_khatri_rao(w1a, w2a)
        if base is None:
            return h @ u.T  # (N, d_out)
        if ctx.autocast[2] or base.dtype != h.dtype:
            return base + (h @ u.T).to(base.dtype)
        return torch.addmm(base, h, u.T)  # base + h Uᵀ in one pass over the (N, d_out) output

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, h, w1a, w1b, w2a, w2b = ctx.saved_tensors
        g_base = g
        g = g.to(h.dtype)  # fp32 factors on a half-precision base: the output (and its gradient) is the base's dtype
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            t, factor_grads = _factored_backward(g, x, h, w1a, w1b, w2a, w2b, ctx.scaling)
            dx = t @ col_khatri_rao(w1b, w2b) if ctx.needs_input_grad[0] else None
            grads = (dx, *factor_grads, None)
            if len(ctx.needs_input_grad) == 6:  # called without base
                return grads
            return grads + (g_base if ctx.needs_input_grad[6] else None,)


def _factored_backward(g, x, h, w1a, w1b, w2a, w2b, scaling: float):
    """t = s · g U (N, r²) and the four factors' gradients, from g = ∂L/∂y (N, d_out), x and h = s · x Vᵀ."""
    r = w1a.shape[1]
    t = (g @ row_khatri_rao(w1a, w2a)).mul_(scaling)  # (N, r²)
    dU = (g.T @ h).view(-1, r, r)  # (d_out, r, r)
    dV = (t.T @ x).view(r, r, -1)  # (r, r, d_in)
    return t, (torch.einsum("iab,ib->ia", dU, w2a), torch.einsum("abj,bj->aj", dV, w2b),
               torch.einsum("iab,ia->ib", dU, w1a), torch.einsum("abj,aj->bj", dV, w1b))


class FactoredLinear(torch.autograd.Function):
    """x Wᵀ + b + ΔW x for a frozen dense base (W, b) on the factored route: :class:`FactoredDelta`
    with the base layer's own GEMMs inside. Backward writes the adapter's input gradient t V into
    the base's g W (one ``addmm_``) instead of leaving autograd to add two (N, d_in) gradients —
    one pass over the layer's input width saved per layer and step (for an MLP's down-projection,
    the widest activations of the block). Only under no autocast and for a frozen W, b.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w1a, w1b, w2a, w2b, scaling: float):
        out = F.linear(x, weight, bias)  # (N, d_out)
        h = (x @ col_khatri_rao(w1b, w2b).T).mul_(scaling)  # (N, r²)
        out.addmm_(h, row_khatri_rao(w1a, w2a).T)
        ctx.save_for_backward(x, h, weight, w1a, w1b, w2a, w2b)
        ctx.scaling = scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, h, weight, w1a, w1b, w2a, w2b = ctx.saved_tensors
        t, factor_grads = _factored_backward(g, x, h, w1a, w1b, w2a, w2b, ctx.scaling)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight).addmm_(t, col_khatri_rao(w1b, w2b))  # (N, d_in): base and adapter at once
        return (dx, None, None, *factor_grads, None)


def choose_forward_mode(d_in: int, d_out: int, r: int, tokens: int, n_adapters: int = 1) -> str:
    """The cheaper of "materialize" and "factored" for ``tokens`` rows of input, by FLOPs.

    materialize: n·(4r + 2)·d_out·d_in to build each ΔW (two rank-r products, their Hadamard
    product, the scale), then 2·tokens·d_in·d_out to apply it.
    factored:    n·r²·(d_out + d_in) to build each U and V, then 2·tokens·r²·(d_in + d_out).
    With many tokens the apply terms dominate and factored wins when r²·(d_in + d_out) < d_in·d_out
    (about r² < min(d_in, d_out) / 2 for square layers); with few tokens (decoding) it nearly always
    wins, because materialising ΔW alone costs ~4r·d_in·d_out.
    """
    materialize = n_adapters * (4 * r + 2) * d_out * d_in + 2 * tokens * d_in * d_out
    factored = n_adapters * r * r * (d_out + d_in) + 2 * tokens * r * r * (d_in + d_out)
    return "factored" if factored < materialize else "materialize"


class LoHaLayer(AdapterLayer):
    """LoHa on one ``nn.Linear`` or GPT-2 ``Conv1D``.

    Per adapter: ``hada_w1_a``/``hada_w2_a`` (d_out, r) and ``hada_w1_b``/``hada_w2_b`` (r, d_in),
    in the logical (out, in) orientation even for Conv1D, as Hugging Face PEFT stores them.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, router) -> None:
        super().__init__(base_layer, router)
        self.in_features, self.out_features = linear_features(unwrap(base_layer))
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.forward_mode: dict[str, str] = {}

    def adapter_names(self) -> list[str]:
        return list(self.hada_w1_a.keys())

    def add(self, name: str, config: LoHaConfig) -> None:
        weight = self.base_weight
        r, d_in, d_out = config.r, self.in_features, self.out_features
        for key, shape in zip(_FACTORS, ((d_out, r), (r, d_in), (d_out, r), (r, d_in))):
            t = torch.empty(shape, dtype=weight.dtype, device=weight.device)
            # FedPara's He init; one zero factor (W2b) is enough to make ΔW = 0.
            if key == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(t)
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            getattr(self, key)[name] = nn.Parameter(t)
        self.r[name] = r
        self.scaling[name] = config.scaling
        self.forward_mode[name] = config.forward_mode

    def delete(self, name: str) -> None:
        for key in _FACTORS:
            del getattr(self, key)[name]
        del self.r[name], self.scaling[name], self.forward_mode[name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key)[name] for key in _FACTORS}

    def delta(self, name: str) -> torch.Tensor:
        """ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha/r, (d_out, d_in)."""
        w1a, w1b, w2a, w2b = (getattr(self, key)[name] for key in _FACTORS)
        return ((w1a @ w1b) * (w2a @ w2b)) * self.scaling[name]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """U = (W1a ⊙r W2a)·alpha/r: (d_out, r²) and V = W1b ⊙c W2b: (r², d_in), with U V = ΔW."""
        w1a, w1b, w2a, w2b = (getattr(self, key)[name] for key in _FACTORS)
        return row_khatri_rao(w1a, w2a) * self.scaling[name], col_khatri_rao(w1b, w2b)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.delta(name)
        return delta.T if self.is_conv1d else delta  # Conv1D stores (in, out)

    def mode_for(self, names: list[str], tokens: int) -> str:
        """The forward mode for ``names`` on this layer: the one they force, else the FLOP pick."""
        forced = {self.forward_mode[n] for n in names} - {"auto"}
        if len(forced) == 1:
            return forced.pop()
        r = max(self.r[n] for n in names)
        return choose_forward_mode(self.in_features, self.out_features, r, tokens, len(names))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        route = self.route
        if not route.is_mixed and not args and not kwargs:
            names = [n for n in route.active if n in self.hada_w1_a and n not in self.merged]
            if len(names) == 1 and self._fuses_with_base(x, names[0]):
                return self._factored_linear(x, names[0])
        result = self.base_layer(x, *args, **kwargs)
        if route.is_mixed:
            delta = self._mixed_delta(x, route)
            return result if delta is None else result + delta.to(result.dtype)
        for name in route.active:
            if name in self.hada_w1_a and name not in self.merged:
                result = self._add_delta(result, x, name)
        return result

    def _fuses_with_base(self, x: torch.Tensor, name: str) -> bool:
        """Whether :class:`FactoredLinear` can run base and adapter together: the base takes it
        (:meth:`~peftlab.layers.AdapterLayer._runs_inside_base`) and the route is factored."""
        return (self._runs_inside_base(x, self.hada_w1_a[name].dtype)
                and self.mode_for([name], x.numel() // self.in_features) == "factored")

    def _factored_linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """base(x) + ΔW x through :class:`FactoredLinear`, (..., d_out)."""
        w1a, w1b, w2a, w2b = (getattr(self, key)[name] for key in _FACTORS)
        base = self.base_layer
        out = FactoredLinear.apply(x.reshape(-1, self.in_features), base.weight, base.bias, w1a, w1b, w2a, w2b,
                                   self.scaling[name])
        return out.view(*x.shape[:-1], self.out_features)

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """result + ΔW x for one adapter on every row, (..., d_out)."""
        x = x.to(self.hada_w1_a[name].dtype)
        if self.mode_for([name], x.numel() // self.in_features) == "factored":
            w1a, w1b, w2a, w2b = (getattr(self, key)[name] for key in _FACTORS)
            out = FactoredDelta.apply(x.reshape(-1, self.in_features), w1a, w1b, w2a, w2b, self.scaling[name],
                                      result.reshape(-1, self.out_features))
            return out.view(result.shape)
        return result + F.linear(x, self.delta(name)).to(result.dtype)

    def _mixed_delta(self, x: torch.Tensor, route: Route) -> torch.Tensor | None:
        """Each row with its own adapter: stack per-adapter tensors once, gather per row, ``bmm``.

        Factored: U and V zero-padded to the largest r² and stacked, (n+1, d_out, R) and
        (n+1, R, d_in); materialised: ΔW stacked, (n+1, d_out, d_in). Rows whose adapter is not on
        this layer, and ``__base__`` rows, get the zero slot.
        """
        mine = [n for n in route.names if n in self.hada_w1_a]
        if not mine:
            return None
        idx = route.index(x.device)  # (B,)
        ref = self.hada_w1_a[mine[0]]
        x = x.to(ref.dtype)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d_in); T = 1 for (B, d_in) inputs
        if self.mode_for(mine, x.numel() // self.in_features) == "factored":
            R = max(self.r[n] ** 2 for n in mine)
            zero_u, zero_v = ref.new_zeros(self.out_features, R), ref.new_zeros(R, self.in_features)
            us, vs = [], []
            for n in route.names:
                if n in self.hada_w1_a:
                    U, V = self.factors(n)
                    us.append(F.pad(U, (0, R - U.shape[1])))  # zero columns of U add nothing
                    vs.append(F.pad(V, (0, 0, 0, R - V.shape[0])))
                else:
                    us.append(zero_u)
                    vs.append(zero_v)
            U_all = torch.stack(us + [zero_u])  # (n+1, d_out, R); the last slot is __base__
            V_all = torch.stack(vs + [zero_v])  # (n+1, R, d_in)
            h = torch.bmm(x3, V_all[idx].transpose(1, 2))  # (B, T, R)
            out = torch.bmm(h, U_all[idx].transpose(1, 2))  # (B, T, d_out)
        else:
            zero = ref.new_zeros(self.out_features, self.in_features)
            D_all = torch.stack([self.delta(n) if n in self.hada_w1_a else zero for n in route.names] + [zero])
            out = torch.bmm(x3, D_all[idx].transpose(1, 2))  # (B, T, d_out)
        return out.reshape(*x.shape[:-1], self.out_features)


def attach(model, name: str, config: LoHaConfig) -> None:
    paths = find_targets(model.base_model, config, default=query_value_targets(model.base_model),
                         types=LINEAR_TYPES)
    model.wrap_modules(paths, name, config, LoHaLayer)


def _to_hf(config: LoHaConfig, model, name: str) -> dict[str, Any]:
    layers = [(p, layer) for p, layer in model.adapter_layers(name) if isinstance(layer, LoHaLayer)]
    conv1d = [p for p, layer in layers if layer.is_conv1d]
    if conv1d:
        raise ConfigError(
            f"Hugging Face PEFT's LoHa supports nn.Linear but not GPT-2's Conv1D, and adapter {name!r} "
            f"targets {conv1d[:3]}{' ...' if len(conv1d) > 3 else ''}; save it with format='peftlab'"
        )
    return {
        "peft_type": "LOHA",
        "task_type": config.task_type,
        "r": config.r,
        "alpha": config.alpha,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "init_weights": config.init_weights,
        **target_fields_to_hf(config, [p for p, _ in layers]),
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def _from_hf(d: dict[str, Any]) -> LoHaConfig:
    for key in ("rank_pattern", "alpha_pattern"):
        if d.get(key):
            raise ConfigError(f"Hugging Face PEFT LoHa option {key}={d[key]!r} is not supported by peftlab yet")
    dropouts = {k: d[k] for k in ("rank_dropout", "module_dropout") if d.get(k)}
    if dropouts:
        # Training-time only: inference is identical without them, so the adapter still loads.
        warnings.warn(f"peftlab's LoHa has no {sorted(dropouts)}; ignoring {dropouts} (they only act in training)")
    return LoHaConfig(
        task_type=d.get("task_type"),
        r=d.get("r", 8),
        alpha=d.get("alpha", 8),
        init_weights=d.get("init_weights", True),
        **target_fields_from_hf(d),
        modules_to_save=d.get("modules_to_save"),
    )


register("loha", LoHaConfig, attach, hf=HFMapping("LOHA", _to_hf, _from_hf))
