"""LoRA: low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

For a frozen weight W (d_out × d_in) the adapted layer computes

    h = W x + (alpha / r) · B A x,        A: (r, d_in), B: (d_out, r)

with A random and B zero at init, so the adapted model starts equal to the base model. With
rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) the scale is alpha / √r.
ΔW = (alpha / r) · B A merges into W for deployment.

Embeddings use A: (r, num_embeddings), B: (dim, r): the row lookup of Aᵀ replaces ``A x``.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353; ``use_dora=True``) splits the adapted
weight into a trained magnitude m (d_out,) and a direction:

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖,      ‖·‖ over d_in, one value per output feature

so h = f ⊙ (W x + s·B A x) + bias with f = m / ‖W + s·B A‖ (d_out,). m starts at that norm, so f = 1
and the start is plain LoRA's. As in the paper (§4.3) and Hugging Face PEFT, the norm is detached:
a constant in backward. The norm needs the full s·B A (d_out × d_in) of each DoRA adapter a forward
touches, once per layer per forward: ~2·r·d_in·d_out extra FLOPs and one d_out × d_in temporary.
Like PEFT, a DoRA adapter stacked after others scales the output so far: f ⊙ (y − bias) + bias +
f ⊙ s·B A x. Mixed batches gather each row's f (ones for plain-LoRA and ``__base__`` rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import AdapterConfig, ConfigError, HFMapping, register
from ..formats.hf_peft import target_fields_from_hf, target_fields_to_hf
from ..layers import AdapterLayer, linear_features
from ..routing import Route
from ..targeting import LINEAR_TYPES, TargetFields, find_targets, query_value_targets, unwrap


_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoraConfig(TargetFields, AdapterConfig):
    """Configuration of a LoRA adapter."""

    method = "lora"

    r: int = 8
    """Rank of the update B A."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / √r with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input (not on the base path), in [0, 1)."""
    use_rslora: bool = False
    """Scale by lora_alpha / √r, which keeps the update's size stable as r grows."""
    bias: str = "none"
    """Which biases train; only "none" (base biases stay frozen) is supported."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zero. "gaussian": A ~ N(0, 1/r), B zero. False: B random too
    (the adapter changes the output from the start — for tests)."""
    fan_in_fan_out: bool = False
    """Recorded for Hugging Face PEFT; GPT-2's Conv1D layout is detected from the module itself."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output feature, applied to the normalised W + s·B A (see the
    module docstring). Mergeable, and per-row routable, like plain LoRA; costs one d_out × d_in
    product per adapter and layer per forward."""

    def validate(self) -> None:
        self.validate_targets()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"LoraConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ConfigError(f"LoraConfig.bias={self.bias!r} is not supported; use bias='none'")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLayer(AdapterLayer):
    """LoRA (and DoRA) on one ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding``.

    Per adapter: ``lora_A[name]`` and ``lora_B[name]``, stored (r, d_in) and (d_out, r) for
    linear layers — the ``nn.Linear`` weight layout — and (r, vocab), (dim, r) for embeddings.
    DoRA adapters add ``magnitude[name]`` (d_out,) — (dim,) for embeddings.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, router) -> None:
        super().__init__(base_layer, router)
        base = unwrap(base_layer)
        self.is_embedding = isinstance(base, nn.Embedding)
        self.in_features, self.out_features = linear_features(base)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.magnitude = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        # DoRA adapters while merged: the factor f they were merged with (unmerging divides by it;
        # it cannot be recomputed from the merged weight).
        self._merged_factor: dict[str, torch.Tensor] = {}
        # Mixed batches: the last stack of frozen adapters, reused until they change.
        self._stacks = ops.StackCache()
        # Layers beside this one that may read the same input (see link_siblings), or None.
        self._siblings: ops.SiblingGroup | None = None

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add(self, name: str, config: LoraConfig) -> None:
        self._stacks.clear()
        weight = self.base_weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        A = torch.empty(config.r, self.in_features, dtype=dtype, device=weight.device)
        B = torch.empty(self.out_features, config.r, dtype=dtype, device=weight.device)
        if config.init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if config.init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.scaling[name] = config.scaling
        self.dropout_p[name] = config.lora_dropout
        if config.use_dora:
            # m = ‖W + s·B A‖ per output feature, so the adapter starts with f = 1.
            with torch.no_grad():
                norm = torch.linalg.norm(self._logical(weight).to(dtype) + self._lora_weight(name), dim=1)
            self.magnitude[name] = nn.Parameter(norm)

    def delete(self, name: str) -> None:
        self._stacks.clear()
        for d in (self.lora_A, self.lora_B):
            del d[name]
        if name in self.magnitude:
            del self.magnitude[name]
        del self.scaling[name], self.dropout_p[name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        # Key names follow Hugging Face PEFT's on-disk layout, so its files map 1:1.
        if self.is_embedding:
            state = {"lora_embedding_A": self.lora_A[name], "lora_embedding_B": self.lora_B[name]}
        else:
            state = {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}
        if name in self.magnitude:
            state["lora_magnitude_vector"] = self.magnitude[name]
        return state

    # -- weights and merging -----------------------------------------------------------------------
    def _logical(self, weight: torch.Tensor) -> torch.Tensor:
        """A base-layout weight seen as (d_out, d_in), or back: nn.Embedding stores (vocab, dim) and
        Conv1D (in, out), both the transpose (a view, so writes reach the original)."""
        return weight.T if (self.is_embedding or self.is_conv1d) else weight

    def _lora_weight(self, name: str) -> torch.Tensor:
        """s·B A, (d_out, d_in)."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    def _dora_factor(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """f = m / ‖W + s·B A‖ per output feature, (d_out,); ``weight`` is W as (d_out, d_in), by
        default the current base weight. The norm is a constant for autograd (DoRA §4.3):
        gradients reach m through f, and A, B only through the s·B A x the caller multiplies by f."""
        m = self.magnitude[name]
        weight = self._logical(self.base_weight) if weight is None else weight
        norm = torch.linalg.norm(weight.to(m.dtype) + self._lora_weight(name).detach(), dim=1)
        return m / norm.detach()

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight, (d_out, d_in), with every merged adapter taken out again (a copy)."""
        weight = self._logical(self.base_weight).detach().clone()
        for name in reversed(self.merged):
            f = self._merged_factor.get(name)
            weight = (weight if f is None else weight / f[:, None]) - self._lora_weight(name).detach()
        return weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW with W + ΔW the adapted weight, W the unmerged base weight; base layout.
        DoRA: ΔW = f ⊙ (W + s·B A) − W."""
        delta = self._lora_weight(name)
        if name in self.magnitude:
            weight = self._unmerged_weight()
            f = self._merged_factor.get(name)
            f = self._dora_factor(name, weight) if f is None else f
            delta = f[:, None] * (weight + delta) - weight
        return self._logical(delta)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W ← W + s·B A, or DoRA's W ← f ⊙ (W + s·B A) with f from the unmerged W (so merging
        after other adapters gives the stacked forward). Merging twice is a no-op. Replaces the
        generic add-ΔW merge: DoRA's is a row scaling, undone by dividing by the same f."""
        if name in self.merged or name not in self.lora_A:
            return
        self._check_merge_target()
        weight = self._logical(self.base_weight)
        merged = weight + self._lora_weight(name).to(weight.dtype)
        if name in self.magnitude:
            f = self._dora_factor(name, self._unmerged_weight())
            self._merged_factor[name] = f
            merged = f[:, None].to(weight.dtype) * merged
        weight.copy_(merged)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last merged first."""
        weight = self._logical(self.base_weight)
        while self.merged:
            name = self.merged.pop()
            f = self._merged_factor.pop(name, None)
            restored = weight if f is None else weight / f[:, None].to(weight.dtype)
            weight.copy_(restored - self._lora_weight(name).to(weight.dtype))

    # -- forward -------------------------------------------------------------------------------
    def _project_in(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A x for one adapter: (..., d_in) @ (d_in, r), or the embedding row lookup."""
        if self.is_embedding:
            base = unwrap(self.base_layer)
            return F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
        return x @ A.T

    def _adapter_input(self, x: torch.Tensor, A: torch.Tensor, p: float) -> torch.Tensor:
        """The adapter branch's input: token ids as they are; activations cast and dropped out."""
        if self.is_embedding:
            return x
        x = x.to(A.dtype)
        return F.dropout(x, p, self.training) if p > 0 else x

    def _dora_base(self, result: torch.Tensor, x_drop: torch.Tensor | None) -> torch.Tensor:
        """DoRA's W x term, as Hugging Face PEFT takes it: the layer's output so far minus the bias
        or, when dropout is active, W x̃ of the dropped-out input (the direction sees x̃ throughout)."""
        if x_drop is not None:
            return F.linear(x_drop, self._logical(self.base_weight).to(x_drop.dtype))
        return result if self.bias is None else result - self.bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        route = self.route
        if not route.is_mixed and not args and not kwargs and torch.is_grad_enabled():
            out = self._inside_base(x, route)
            if out is not None:
                return out
        result = self.base_layer(x, *args, **kwargs)
        share, group = None, self._siblings
        if group is not None and ops.fusing() and not (group.skip[0] is route and group.skip[1] == x.shape):
            share = group.take(self._router.scratch, self, x)
            if share is None:
                share = (self._share_mixed if route.is_mixed else self._share)(x, route)
        if route.is_mixed:
            if share is not None:  # (path, this layer's slice of x Aᵀ, its stack, idx)
                return ops.up_rows(share[1], share[0], share[2], share[3], out=result)
            return self._mixed_forward(x, result, route)
        for name in route.active:
            if name in self.lora_A and name not in self.merged:
                A, B = self.lora_A[name], self.lora_B[name]
                if share is not None and name in share:  # x Aᵀ, computed with the siblings'
                    result = ops.add_up(result, share[name], B, self.scaling[name])
                    continue
                if (x.dtype != A.dtype and x.dtype in _HALF and not self.is_embedding and name not in self.magnitude
                        and not (self.training and self.dropout_p[name] > 0)):
                    # fp32 weights on a half-precision base (autocast_adapter_dtype): computed in the
                    # base's dtype, as inside the base (ops.LoraLinear) — the weights cast down, not x up
                    result = ops.add_low_rank(result, x, A.to(x.dtype), B.to(x.dtype), self.scaling[name])
                    continue
                x_a = self._adapter_input(x, A, self.dropout_p[name])
                if name not in self.magnitude and not self.is_embedding:
                    # result + s·(x Aᵀ) Bᵀ as one addmm (in place when no gradient is needed)
                    result = ops.add_low_rank(result, x_a, A, B, self.scaling[name])
                    continue
                delta = (self._project_in(x_a, A) @ B.T) * self.scaling[name]
                if name in self.magnitude:
                    # f ⊙ (W x + s·B A x) − W x, added on top of the output so far.
                    dropped = self.training and self.dropout_p[name] > 0 and not self.is_embedding
                    f = self._dora_factor(name)
                    delta = (f - 1) * self._dora_base(result, x_a if dropped else None) + f * delta
                result = result + delta.to(result.dtype)
        return result

    def _inside_base(self, x: torch.Tensor, route: Route) -> torch.Tensor | None:
        """Training one plain LoRA adapter on a plain frozen ``nn.Linear``: base and adapter as one
        autograd node (:class:`peftlab.ops.LoraLinear`); None where that does not apply (DoRA,
        dropout, embeddings, several adapters here, no gradient needed, or the base layer does not
        take it: :meth:`~peftlab.layers.AdapterLayer._runs_inside_base`). Siblings then compute
        their own down-projections: inside the base, each is one small GEMM of the base's pass."""
        names = [n for n in route.active if n in self.lora_A and n not in self.merged]
        if len(names) != 1 or self.is_embedding:
            return None
        name = names[0]
        A, B = self.lora_A[name], self.lora_B[name]
        if (name in self.magnitude or (self.training and self.dropout_p[name] > 0)
                or not (x.requires_grad or A.requires_grad or B.requires_grad) or not A.is_floating_point()
                or not self._runs_inside_base(x, x.dtype)):  # fp32 A, B on a half base: LoraLinear casts them
            return None
        base = self.base_layer
        out = ops.LoraLinear.apply(x.reshape(-1, self.in_features), base.weight, base.bias, A, B, self.scaling[name])
        return out.view(*x.shape[:-1], self.out_features)

    # -- sharing the down-projection with siblings (ops.fuse) -----------------------------------------
    # Only plain LoRA with identity dropout shares: DoRA needs its own norms, and sharing one x Aᵀ
    # would mean sharing one dropout mask, where separate layers draw independent masks.
    def _can_share(self, name: str) -> bool:
        return (name in self.lora_A and name not in self.merged and name not in self.magnitude
                and not (self.training and self.dropout_p[name] > 0))

    def _siblings_for(self, route: Route) -> list[LoraLayer]:
        """Members of this layer's group that can share on ``route`` (this one included, if it can)."""
        names = route.names if route.is_mixed else route.active
        return [m for m in self._siblings.members() if m._router is self._router and not m.merged
                and any(m._can_share(n) for n in names)
                and (not route.is_mixed or all(m._can_share(n) for n in names if n in m.lora_A))]

    def _share(self, x: torch.Tensor, route: Route) -> dict[str, torch.Tensor] | None:
        """This layer's x Aᵀ per active adapter, computed in one matmul with every sibling's
        ([A_q; A_k; A_v] stacked); the siblings' parts are left in the router's scratch.
        None when there is nothing to share, or too little input to gain by it."""
        if x.numel() < ops.fuse.SHARE_MIN_TOKENS * x.shape[-1]:
            self._siblings.skip = (route, x.shape)
            return None
        members = self._siblings_for(route)
        units = [(m, n) for m in members for n in route.active if m._can_share(n)]
        # fp32 adapters on a half-precision base compute per layer in the base's dtype (see forward),
        # as training does; sharing would cast x up instead.
        dtypes = {m.lora_A[n].dtype for m, n in units}
        if self not in members or len(members) < 2 or len(dtypes) > 1 or (x.dtype in _HALF and dtypes != {x.dtype}):
            return None
        As = [m.lora_A[n] for m, n in units]
        h = F.linear(x.to(As[0].dtype), torch.cat(As))  # (..., Σr)
        shares: dict = {}
        for (m, n), part in zip(units, h.split([a.shape[0] for a in As], dim=-1)):
            shares.setdefault(m, {})[n] = part
        mine = shares.pop(self)
        self._siblings.leave(self._router.scratch, x, shares)
        return mine

    def _share_mixed(self, x: torch.Tensor, route: Route) -> tuple | None:
        """The mixed-route :meth:`_share`: every sibling's stack side by side
        (:class:`ops.FusedDown`), one down-projection over the rows (:func:`ops.shared_down`).
        Frozen stacks' fusion is kept for the route (a ``generate`` reuses it every step)."""
        group = self._siblings
        plan = group.plan
        if plan is None or plan[0] is not route or plan[1] != self.training:
            pairs = [(m, m._mixed_stack(route)) for m in self._siblings_for(route)]
            members, stacks = [m for m, s in pairs if s is not None], [s for _, s in pairs if s is not None]
            fused = None if plan is None else plan[3]  # the last frozen fusion: reused for the same stacks
            if fused is None or [id(s) for s in fused.stacks] != [id(s) for s in stacks]:
                fused = None
                if self in members and len(members) > 1 and len({s.A.dtype for s in stacks}) == 1:
                    fused = ops.FusedDown(stacks)
            plan = (route, self.training, members, fused)
            group.plan = plan if fused is None or not fused.A.requires_grad else None
        _, _, members, fused = plan
        if fused is None or self not in members:
            return None
        idx = route.index(x.device)  # (B,)
        down = ops.shared_down(x, fused, idx)
        if down is None:  # not worth it for this route and shape (decode steps): no member asks again
            group.skip = (route, x.shape)
            return None
        path, hs = down
        shares = {m: (path, h, s, idx) for m, s, h in zip(members, fused.stacks, hs)}
        mine = shares.pop(self)
        group.leave(self._router.scratch, x, shares)
        return mine

    def _mixed_stack(self, route: Route) -> ops.low_rank.LowRankStack | None:
        """This layer's adapters stacked in ``route.names`` order (ranks zero-padded; names not on
        this layer, and the final ``__base__`` slot, are zeros), or None if it has none of them.
        Frozen adapters' stack is cached until they change (:class:`peftlab.ops.StackCache`)."""
        names = route.names
        stack = self._stacks.lookup(names, route)
        if stack is None:
            mine = [n for n in names if n in self.lora_A]
            if not mine:
                return None
            stack = ops.stack_low_rank([(self.lora_A[n], self.lora_B[n], self.scaling[n]) if n in self.lora_A
                                        else None for n in names])  # A (S, r, d_in), B (S, r, d_out)
            self._stacks.store(names, [t for n in mine for t in (self.lora_A[n], self.lora_B[n])], stack, route)
        return stack

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor, route: Route) -> torch.Tensor:
        """Each row with its own adapter: :func:`peftlab.ops.low_rank_rows` over
        :meth:`_mixed_stack`. DoRA rows are then scaled by their adapter's f (ones for the other
        rows).
        """
        stack = self._mixed_stack(route)
        if stack is None:
            return result
        names = route.names
        idx = route.index(x.device)  # (B,)

        x_drop = None
        if self.training and not self.is_embedding and any(self.dropout_p.get(n, 0.0) > 0 for n in names):
            x = x.to(stack.A.dtype)
            p = stack.A.new_tensor([self.dropout_p.get(n, 0.0) for n in names] + [0.0])[idx]  # (B,)
            view = (-1,) + (1,) * (x.dim() - 1)
            keep = (torch.rand_like(x) >= p.view(view)).to(x.dtype)
            x = x_drop = x * keep / (1 - p).view(view)

        if not (self.magnitude and any(n in self.magnitude for n in names)):
            return ops.low_rank_rows(x, stack, idx, out=result)
        delta = ops.low_rank_rows(x, stack, idx)  # (B, ..., d_out): s·B A x per row
        ones = stack.A.new_ones(self.out_features)
        f = torch.stack([self._dora_factor(n) if n in self.magnitude else ones
                         for n in names] + [ones])[idx]  # (B, d_out)
        f = f.view(f.shape[0], *(1,) * (delta.dim() - 2), -1)
        delta = (f - 1) * self._dora_base(result, x_drop) + f * delta
        return result + delta.to(result.dtype)


def link_siblings(model: nn.Module) -> None:
    """Group the LoRA layers that may read one input: children of one parent with one input width
    (q/k/v of an attention block, gate/up of an MLP — found by shape, no module names). A member
    that turns out to read another tensor leaves its group on first sight (:class:`ops.SiblingGroup`)."""
    for parent in model.modules():
        widths: dict[int, list[LoraLayer]] = {}
        for child in parent.children():
            if isinstance(child, LoraLayer) and not child.is_embedding:
                widths.setdefault(child.in_features, []).append(child)
        for members in widths.values():
            group = ops.SiblingGroup(members) if len(members) > 1 else None
            for m in members:
                m._siblings = group


def attach(model, name: str, config: LoraConfig) -> None:
    paths = find_targets(model.base_model, config, default=query_value_targets(model.base_model),
                         types=LINEAR_TYPES + (nn.Embedding,))
    model.wrap_modules(paths, name, config, LoraLayer)
    link_siblings(model.base_model)


def _to_hf(config: LoraConfig, model, name: str) -> dict[str, Any]:
    paths = [p for p, layer in model.adapter_layers(name) if isinstance(layer, LoraLayer)]  # not the heads
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "bias": config.bias,
        "init_lora_weights": config.init_lora_weights,
        "fan_in_fan_out": config.fan_in_fan_out,
        **target_fields_to_hf(config, paths),
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": config.use_dora,
        "inference_mode": True,
    }


# Hugging Face PEFT fields whose non-default values change the math; we refuse them rather than
# load an adapter that would silently compute something else.
_HF_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {},
                   "layer_replication": None, "lora_bias": False, "target_parameters": None}


def _from_hf(d: dict[str, Any]) -> LoraConfig:
    for key, default in _HF_UNSUPPORTED.items():
        if d.get(key, default) not in (default, None, {}, [], False):
            raise ConfigError(f"Hugging Face PEFT LoRA option {key}={d[key]!r} is not supported by peftlab yet")
    return LoraConfig(
        task_type=d.get("task_type"),
        r=d["r"],
        lora_alpha=d.get("lora_alpha", 8),
        lora_dropout=d.get("lora_dropout", 0.0),
        use_rslora=d.get("use_rslora", False),
        bias=d.get("bias", "none"),
        init_lora_weights=d.get("init_lora_weights", True),
        fan_in_fan_out=d.get("fan_in_fan_out", False),
        use_dora=d.get("use_dora", False),
        **target_fields_from_hf(d),
        modules_to_save=d.get("modules_to_save"),
    )


register("lora", LoraConfig, attach, hf=HFMapping("LORA", _to_hf, _from_hf))
