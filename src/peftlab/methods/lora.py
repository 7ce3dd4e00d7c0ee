"""LoRA: low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

For a frozen weight W (d_out × d_in) the adapted layer computes

    h = W x + (alpha / r) · B A x,        A: (r, d_in), B: (d_out, r)

with A random and B zero at init, so the adapted model starts equal to the base model. With
rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) the scale is alpha / √r.
ΔW = (alpha / r) · B A merges into W for deployment.

Embeddings use A: (r, num_embeddings), B: (dim, r): the row lookup of Aᵀ replaces ``A x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, ConfigError, HFMapping, register
from ..formats.hf_peft import target_fields_from_hf, target_fields_to_hf
from ..layers import AdapterLayer, linear_features
from ..routing import Route
from ..targeting import LINEAR_TYPES, TargetFields, find_targets, unwrap


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

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLayer(AdapterLayer):
    """LoRA on one ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding``.

    Per adapter: ``lora_A[name]`` and ``lora_B[name]``, stored (r, d_in) and (d_out, r) for
    linear layers — the ``nn.Linear`` weight layout — and (r, vocab), (dim, r) for embeddings.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, router) -> None:
        super().__init__(base_layer, router)
        base = unwrap(base_layer)
        self.is_embedding = isinstance(base, nn.Embedding)
        self.in_features, self.out_features = linear_features(base)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add(self, name: str, config: LoraConfig) -> None:
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

    def delete(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B):
            del d[name]
        del self.scaling[name], self.dropout_p[name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        # Key names follow Hugging Face PEFT's on-disk layout, so its files map 1:1.
        if self.is_embedding:
            return {"lora_embedding_A": self.lora_A[name], "lora_embedding_B": self.lora_B[name]}
        return {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]  # (d_out, d_in)
        # nn.Embedding stores (vocab, dim) and Conv1D (in, out): both the transpose.
        return delta.T if (self.is_embedding or self.is_conv1d) else delta

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

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        route = self.route
        if route.is_mixed:
            return result + self._mixed_delta(x, route).to(result.dtype)
        for name in route.active:
            if name in self.lora_A and name not in self.merged:
                A, B = self.lora_A[name], self.lora_B[name]
                h = self._project_in(self._adapter_input(x, A, self.dropout_p[name]), A)
                result = result + ((h @ B.T) * self.scaling[name]).to(result.dtype)
        return result

    def _mixed_delta(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """Each row with its own adapter: gather A/B per row once, then two batched matmuls.

        Adapters of different rank are zero-padded to the largest rank (zeros add nothing).
        Rows whose adapter is not on this layer, and ``__base__`` rows, use a zero slot.
        """
        names = route.names
        idx = route.index(x.device)  # (B,)
        r_max = max((self.lora_A[n].shape[0] for n in names if n in self.lora_A), default=0)
        ref = next(iter(self.lora_A.values()))
        if r_max == 0:
            return torch.zeros((), dtype=ref.dtype, device=ref.device)

        def stack(params: nn.ParameterDict, shape_of, pad_dim: int) -> torch.Tensor:
            slots = []
            for n in names:
                if n in params:
                    t = params[n]
                    pad = r_max - t.shape[pad_dim]
                    slots.append(F.pad(t, (0, pad) if pad_dim == 1 else (0, 0, 0, pad)) if pad else t)
                else:
                    slots.append(ref.new_zeros(shape_of))
            slots.append(ref.new_zeros(shape_of))  # the __base__ slot
            return torch.stack(slots)

        A_all = stack(self.lora_A, (r_max, self.in_features), 0)  # (n+1, r, d_in)
        B_all = stack(self.lora_B, (self.out_features, r_max), 1)  # (n+1, d_out, r)
        scale = ref.new_tensor([self.scaling.get(n, 0.0) for n in names] + [0.0])[idx]  # (B,)

        if self.is_embedding:
            h = A_all.transpose(1, 2)[idx[:, None], x]  # (B, T, r): row lookup in each row's Aᵀ
        else:
            x = x.to(ref.dtype)
            p = ref.new_tensor([self.dropout_p.get(n, 0.0) for n in names] + [0.0])[idx]
            if self.training and bool((p > 0).any()):
                view = (-1,) + (1,) * (x.dim() - 1)
                keep = (torch.rand_like(x) >= p.view(view)).to(x.dtype)
                x = x * keep / (1 - p).view(view)
            squeeze = x.dim() == 2  # (B, d_in): one token per row
            x3 = x.unsqueeze(1) if squeeze else x.reshape(x.shape[0], -1, x.shape[-1])
            h = torch.bmm(x3, A_all[idx].transpose(1, 2))  # (B, T, r)
        out = torch.bmm(h.reshape(h.shape[0], -1, r_max), B_all[idx].transpose(1, 2))  # (B, T, d_out)
        out = out * scale.view(-1, 1, 1)
        return out.reshape(*x.shape[:-1], self.out_features) if not self.is_embedding else out


def attach(model, name: str, config: LoraConfig) -> None:
    paths = find_targets(model.base_model, config, types=LINEAR_TYPES + (nn.Embedding,))
    model.wrap_modules(paths, name, config, LoraLayer)


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
        "use_dora": False,
        "inference_mode": True,
    }


# Hugging Face PEFT fields whose non-default values change the math; we refuse them rather than
# load an adapter that would silently compute something else.
_HF_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
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
        **target_fields_from_hf(d),
        modules_to_save=d.get("modules_to_save"),
    )


register("lora", LoraConfig, attach, hf=HFMapping("LORA", _to_hf, _from_hf))
