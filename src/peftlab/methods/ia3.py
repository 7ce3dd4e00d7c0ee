"""(IA)³: infused adapter by inhibiting and amplifying inner activations
(Liu et al. 2022, https://arxiv.org/abs/2205.05638).

Each targeted linear layer learns one vector that rescales activations element-wise:

    keys, values (output scaling):          h = (W x + b) ⊙ l,     l: (d_out,)   (l_k, l_v)
    FFN down-projection (input scaling):    h = W (x ⊙ l) + b,     l: (d_in,)    (l_ff)

so an adapter is a few thousand numbers. With l = 1 at init the model starts as the base model.
Several active adapters multiply their vectors. Merging rescales the weight in place:
W ← diag(l) W and b ← l ⊙ b for output scaling, W ← W diag(l) (bias untouched) for input
scaling; unmerging divides again.

Vectors are stored in Hugging Face PEFT's layout, so its files map 1:1: ``ia3_l`` is (d_out, 1)
for output scaling and (1, d_in) for input scaling — the shape alone says which role it plays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import AdapterConfig, ConfigError, HFMapping, register
from ..layers import AdapterLayer, linear_features
from ..routing import Route
from ..targeting import ALL_LINEAR, LINEAR_TYPES, TargetFields, find_targets, logical_modules, matches, unwrap

# Keys, values and the FFN down-projection per model type, as Hugging Face PEFT's
# TRANSFORMERS_MODELS_TO_IA3_* tables give them, with one deliberate difference: for BERT-style
# encoders PEFT's "output.dense" also hits ``attention.output.dense`` (and scales its input); here
# only the FFN's ``layer.N.output.dense`` is targeted, which is the paper's l_ff.
_BERT_FFN = r".*\.layer\.\d+\.output\.dense"
_BERT = (rf".*\.(key|value)|{_BERT_FFN}", _BERT_FFN)
_KV_DOWN = (("k_proj", "v_proj", "down_proj"), ("down_proj",))
_QV_DOWN = (("q_proj", "v_proj", "down_proj"), ("down_proj",))
_QV_FC2 = (("q_proj", "v_proj", "fc2"), ("fc2",))
_NEOX = (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",))
DEFAULTS: dict[str, tuple[str | tuple[str, ...], str | tuple[str, ...]]] = {
    "llama": _KV_DOWN, "mistral": _KV_DOWN,
    "qwen2": _QV_DOWN, "qwen3": _QV_DOWN, "gemma": _QV_DOWN, "gemma2": _QV_DOWN, "gemma3_text": _QV_DOWN,
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bert": _BERT, "roberta": _BERT,
    "t5": (("k", "v", "wo"), ("wo",)), "mt5": (("k", "v", "wi_1"), ()),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)), "bart": _QV_FC2, "phi": _QV_FC2,
    "gpt_neox": _NEOX, "falcon": _NEOX,
}
"""model_type -> (default target_modules, default feedforward_modules)."""


@dataclass(frozen=True)
class IA3Config(TargetFields, AdapterConfig):
    """Configuration of an (IA)³ adapter. ``target_modules=None`` uses :data:`DEFAULTS`."""

    method = "ia3"

    feedforward_modules: str | tuple[str, ...] | None = None
    """The targets whose INPUT is scaled (the FFN activation before the down-projection, l_ff), as
    names, dotted suffixes or one regex, like ``target_modules``; every other target has its OUTPUT
    scaled (l_k, l_v). None = the architecture's default from :data:`DEFAULTS`."""
    init_ia3_weights: bool = True
    """True: vectors start at 1, so the adapted model starts equal to the base model. False:
    standard-normal vectors (the adapter changes the output from the start — for tests)."""

    def validate(self) -> None:
        self.validate_targets()
        ff = self.feedforward_modules
        if ff == ALL_LINEAR:
            raise ConfigError(
                "IA3Config.feedforward_modules='all-linear' is not meaningful: name the FFN "
                "down-projections (e.g. ['down_proj']) or pass [] to scale every output"
            )
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as exc:
                raise ConfigError(
                    f"IA3Config.feedforward_modules={ff!r} is not a valid regular expression: {exc}"
                ) from None
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")


class IA3Layer(AdapterLayer):
    """(IA)³ on one ``nn.Linear`` or GPT-2 ``Conv1D``.

    Per adapter: ``ia3_l[name]``, (1, d_in) when it scales the input (``feedforward[name]``) and
    (d_out, 1) when it scales the output. Adapters on one layer may play different roles.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, router) -> None:
        super().__init__(base_layer, router)
        self.in_features, self.out_features = linear_features(unwrap(base_layer))
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def add(self, name: str, config: IA3Config, feedforward: bool = False) -> None:
        weight = self.base_weight
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        if config.init_ia3_weights:
            vector = torch.ones(shape, dtype=weight.dtype, device=weight.device)
        else:
            vector = torch.randn(shape, dtype=weight.dtype, device=weight.device)
        self.ia3_l[name] = nn.Parameter(vector)
        self.feedforward[name] = feedforward

    def delete(self, name: str) -> None:
        del self.ia3_l[name], self.feedforward[name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    def _weight_scale(self, name: str) -> torch.Tensor:
        """``ia3_l`` shaped to broadcast over the base weight: rows or columns of (out, in), and the
        transpose for Conv1D's (in, out)."""
        vector = self.ia3_l[name]
        return vector.T if self.is_conv1d else vector

    def delta_weight(self, name: str) -> torch.Tensor:
        """W·(l − 1) in the base weight's layout, for the base weight as it is now.

        (IA)³ is multiplicative, so this is only the additive view of one merge; :meth:`merge`
        and :meth:`unmerge` multiply and divide directly (and rescale the bias for output scaling).
        """
        return self.base_weight * (self._weight_scale(name) - 1).to(self.base_weight.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Rescale the base weight (and bias, for output scaling) by ``ia3_l``. Idempotent."""
        if name in self.merged or name not in self.ia3_l:
            return
        self._check_merge_target()
        vector = self.ia3_l[name]
        if not torch.isfinite(vector).all() or bool((vector == 0).any()):
            raise ValueError(
                f"adapter {name!r}: ia3_l holds zero or non-finite entries, so merging could not be "
                f"undone by unmerge_adapter(); keep this adapter unmerged"
            )
        self.base_weight.mul_(self._weight_scale(name).to(self.base_weight.dtype))
        if not self.feedforward[name] and self.bias is not None:
            self.bias.mul_(vector.flatten().to(self.bias.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide every merged adapter out again, last merged first."""
        while self.merged:
            name = self.merged.pop()
            self.base_weight.div_(self._weight_scale(name).to(self.base_weight.dtype))
            if not self.feedforward[name] and self.bias is not None:
                self.bias.div_(self.ia3_l[name].flatten().to(self.bias.dtype))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        route = self.route
        l_in, l_out = self._per_row(x, route) if route.is_mixed else self._stacked_product(route.active)
        if l_in is not None:
            x = (x.to(l_in.dtype) * l_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if l_out is not None:
            result = (result * l_out).to(result.dtype)
        return result

    def _stacked_product(self, active: tuple[str, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Whole-batch route: the product of the active adapters' vectors, per role."""
        scales: dict[bool, torch.Tensor] = {}
        for name in active:
            if name in self.ia3_l and name not in self.merged:
                role, vector = self.feedforward[name], self.ia3_l[name].flatten()
                scales[role] = scales[role] * vector if role in scales else vector
        return scales.get(True), scales.get(False)

    def _per_row(self, x: torch.Tensor, route: Route) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Mixed batch: each row's own vector, gathered from a stack — no loop over rows or adapters.

        The stack is (n_names + 1, d) in :attr:`Route.names` order; names not on this layer (or
        playing the other role here) and the final ``__base__`` slot hold ones.
        """
        idx = route.index(x.device)  # (B,)
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)  # broadcast (B, d) over (B, ..., d)
        out = []
        for role, dim in ((True, self.in_features), (False, self.out_features)):
            mine = [n for n in route.names if n in self.ia3_l and self.feedforward[n] is role]
            if not mine:
                out.append(None)
                continue
            ones = self.ia3_l[mine[0]].new_ones(dim)
            stack = torch.stack([self.ia3_l[n].flatten() if n in mine else ones for n in route.names] + [ones])
            out.append(stack[idx].view(view))  # (B, 1, ..., d)
        return out[0], out[1]


def attach(model, name: str, config: IA3Config) -> None:
    base = model.base_model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    default_targets, default_ff = DEFAULTS.get(model_type, (None, None))
    paths = find_targets(base, config, default=default_targets, types=LINEAR_TYPES)
    ff_spec = config.feedforward_modules if config.feedforward_modules is not None else default_ff
    if ff_spec is None:
        raise ConfigError(
            f"feedforward_modules is not set and there is no default for model_type {model_type!r}; "
            f"pass feedforward_modules=[...] (the FFN down-projections, whose input is scaled) or [] "
            f"(scale every target's output)"
        )
    if config.feedforward_modules is not None:
        specs = [ff_spec] if isinstance(ff_spec, str) else [(entry,) for entry in ff_spec]
        stray = [s if isinstance(s, str) else s[0] for s in specs if not any(matches(p, s) for p in paths)]
        if stray:
            raise ConfigError(
                f"feedforward_modules entries {stray} match none of the targeted modules "
                f"({paths[:4]}{', ...' if len(paths) > 4 else ''}); feedforward modules must also be targets"
            )
    ff = [p for p in paths if matches(p, ff_spec)]
    model.wrap_modules(ff, name, config, IA3Layer, feedforward=True)
    model.wrap_modules([p for p in paths if p not in ff], name, config, IA3Layer, feedforward=False)


def _hf_names(paths: list[str], ff: list[str], all_paths: list[str]) -> tuple[list[str], list[str]]:
    """Target and feedforward lists that select exactly ``paths`` and ``ff`` under PEFT's rules.

    Leaf names when they do (the readable, usual case); otherwise the full paths, e.g. for BERT,
    where the leaf "dense" would also hit the attention output and the pooler.
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    ff_leaves = sorted({p.rsplit(".", 1)[-1] for p in ff})
    # PEFT: a target matches by equality or dotted suffix; a feedforward name by plain suffix.
    hit = {p for p in all_paths if matches(p, leaves)}
    ff_hit = {p for p in paths if any(p.endswith(t) for t in ff_leaves)}
    if hit == set(paths) and ff_hit == set(ff):
        return leaves, ff_leaves
    return sorted(paths), sorted(ff)


def _to_hf(config: IA3Config, model, name: str) -> dict[str, Any]:
    layers = [(p, layer) for p, layer in model.adapter_layers(name) if isinstance(layer, IA3Layer)]
    paths = [p for p, _ in layers]
    ff = [p for p, layer in layers if layer.feedforward[name]]
    targets, ff_names = _hf_names(paths, ff, [p for p, _ in logical_modules(model.base_model) if p])
    return {
        "peft_type": "IA3",
        "task_type": config.task_type,
        # Explicit lists: the targeting (defaults, regexes, layers_to_transform) is already resolved.
        "target_modules": targets,
        "feedforward_modules": ff_names,
        "exclude_modules": None,
        # PEFT sets this per layer from the module type; it only matters for its merge.
        "fan_in_fan_out": all(layer.is_conv1d for _, layer in layers),
        "init_ia3_weights": config.init_ia3_weights,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "inference_mode": True,
    }


def _from_hf(d: dict[str, Any]) -> IA3Config:
    return IA3Config(
        task_type=d.get("task_type"),
        target_modules=d.get("target_modules"),
        exclude_modules=d.get("exclude_modules"),
        feedforward_modules=d.get("feedforward_modules"),
        init_ia3_weights=d.get("init_ia3_weights", True),
        modules_to_save=d.get("modules_to_save"),
    )


register("ia3", IA3Config, attach, hf=HFMapping("IA3", _to_hf, _from_hf))
