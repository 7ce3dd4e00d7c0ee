"""Bottleneck adapters: Houlsby, Pfeiffer and parallel.

Houlsby et al. 2019 (https://arxiv.org/abs/1902.00751) put a small two-layer network after a
sub-layer's output projection, before the residual add. With h the projection's output (..., d):

    out = h + s · (U act(D h + b_D) + b_U),     D: (m, d), b_D: (m,), U: (d, m), b_U: (d,)

"houlsby" adapts the attention output and the FFN output of every layer; "pfeiffer" (Pfeiffer et
al. 2020, https://arxiv.org/abs/2005.00247) only the FFN output. "parallel" (He et al. 2021,
https://arxiv.org/abs/2110.04366) runs the adapter beside the FFN, on the FFN's input x:

    out = FFN(x) + s · (U act(D x + b_D) + b_U)

With U and b_U zero at init ("zero") the adapted model starts equal to the base model. Nothing
here is linear in x, so the adapters cannot be merged into the base weights.

Where the default targets sit (read from each model's forward in ``transformers``):

* Llama family (pre-LN): ``LlamaDecoderLayer`` does ``residual + self_attn(...)`` and
  ``residual + mlp(...)``; ``self_attn`` ends in ``o_proj`` and ``mlp`` returns ``down_proj(...)``,
  so wrapping ``self_attn.o_proj`` / ``mlp.down_proj`` sees each sub-layer's output just before
  its residual add.
* GPT-2 (pre-LN): ``attn.c_proj`` then ``resid_dropout`` then the residual add; ``mlp.c_proj``
  then ``dropout`` then the add. The adapter runs before the dropout.
* BERT (post-LN): ``BertSelfOutput``/``BertOutput`` compute ``LayerNorm(dropout(dense(h)) + x)``;
  wrapping ``attention.output.dense`` and ``layer.N.output.dense`` (the FFN's output — not
  ``attention.output.dense`` twice, hence the anchored pattern) puts the adapter before the
  dropout, the residual add and the LayerNorm, Houlsby's placement.
* T5 (pre-LN): ``T5LayerSelfAttention`` adds ``dropout(SelfAttention(...))`` whose last step is
  ``o``; ``T5LayerFF`` adds ``dropout(DenseReluDense(...))`` whose last step is ``wo``. Cross-
  attention (``EncDecAttention.o``) is not adapted by default: Houlsby's recipe names
  self-attention and the FFN, as does AdapterHub's default; add "EncDecAttention.o" to
  ``target_modules`` to adapt it too.

For "parallel" the sub-layer is the FFN, as in He et al.: Llama ``mlp``, GPT-2 ``mlp``, T5
``DenseReluDense`` (in pre-LN models x is the layer-normed hidden state the FFN reads). BERT splits
its FFN into ``intermediate`` and ``output``; ``BertOutput.forward(hidden_states, input_tensor)``
receives the FFN's input as ``input_tensor`` and adds it as the residual before its LayerNorm, so
the adapter reads ``input_tensor`` and adds its branch to it: ``LN(x + FFN(x) + s · adapter(x))``,
the parallel adapter of a post-LN block, without copying any model code.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, ConfigError, register
from ..layers import AdapterLayer, ModulesToSaveLayer, floating_tensor, linear_features
from ..routing import Route
from ..targeting import ALL_LINEAR, LINEAR_TYPES, TargetFields, find_targets, logical_modules, unwrap

VARIANTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}
INITS = ("zero", "normal", "random")

# (attention output, FFN output, FFN module for "parallel"): regexes on logical module paths. The
# first family whose FFN output exists in the model gives the defaults.
_FAMILIES = (
    (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj", r".*\.mlp"),  # llama, mistral, qwen2, ...
    (r".*\.attn\.c_proj", r".*\.mlp\.c_proj", r".*\.mlp"),  # gpt2 (".attn." skips crossattention)
    (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output"),  # bert
    (r".*\.SelfAttention\.o", r".*\.DenseReluDense\.wo", r".*\.DenseReluDense"),  # t5
)
# A BERT-style post-LN output module that gets the residual as this argument (see module docstring).
_RESIDUAL_ARG = "input_tensor"


@dataclass(frozen=True)
class BottleneckConfig(TargetFields, AdapterConfig):
    """Configuration of a bottleneck adapter (set exactly one of ``bottleneck``/``reduction_factor``)."""

    method = "bottleneck"

    variant: str = "houlsby"
    """"houlsby": after the attention and the FFN output projections; "pfeiffer": after the FFN
    output only; "parallel": beside the FFN, reading its input (see the module docstring)."""
    bottleneck: int | None = None
    """Bottleneck size m, the same in every adapted module."""
    reduction_factor: int | None = None
    """Bottleneck size as a fraction of the width: m = d // reduction_factor (Pfeiffer uses 16)."""
    activation: str = "relu"
    """Non-linearity between the projections: "relu", "gelu" or "swish" (SiLU)."""
    init: str = "zero"
    """"zero": D like ``nn.Linear``, U and both biases zero (starts equal to the base model).
    "normal": both weights truncated normal std 1e-2 at ±2 std, biases zero (Houlsby's near
    identity). "random": both projections as ``nn.Linear`` initialises them (for tests)."""
    scaling: float = 1.0
    """s, the factor on the adapter branch. 1 is the sequential papers' formula; He et al. use 4
    for the parallel FFN adapter. Applies to every variant."""
    train_layernorms: bool = False
    """Also train the norm layers of every transformer layer holding this adapter, as Houlsby et
    al. do: each adapter gets its own copies (via ``modules_to_save``'s layer), so rows of a mixed
    batch use their adapter's norms."""

    def validate(self) -> None:
        self.validate_targets()
        if self.variant not in VARIANTS:
            raise ConfigError(f"BottleneckConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if (self.bottleneck is None) == (self.reduction_factor is None):
            raise ConfigError(
                f"BottleneckConfig needs exactly one of bottleneck (got {self.bottleneck!r}) and "
                f"reduction_factor (got {self.reduction_factor!r}); e.g. bottleneck=64 or reduction_factor=16"
            )
        for fname in ("bottleneck", "reduction_factor"):
            value = getattr(self, fname)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"BottleneckConfig.{fname} must be a positive int, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"BottleneckConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.init not in INITS:
            raise ConfigError(f"BottleneckConfig.init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ConfigError(f"BottleneckConfig.scaling must be a finite number, got {self.scaling!r}")
        if self.target_modules == ALL_LINEAR:
            raise ConfigError(
                "BottleneckConfig.target_modules='all-linear' would put an adapter after every projection; "
                "leave it None for the variant's default, or name the output projections"
            )

    def size(self, width: int) -> int:
        """m for a module of output width ``width``."""
        return self.bottleneck if self.bottleneck is not None else width // self.reduction_factor


def _features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear layer, or of a block from its first and last linear layer."""
    linears = [m for m in module.modules() if isinstance(m, LINEAR_TYPES)]
    if not linears:
        raise ConfigError(
            f"cannot read the width of {type(module).__name__}: it holds no nn.Linear/Conv1D; "
            f"target the FFN (or output projection) module instead"
        )

    return linear_features(linears[0])[0], linear_features(linears[-1])[1]


class BottleneckLayer(AdapterLayer):
    """The adapters of one wrapped module: per adapter ``adapter_down`` (m, d_in) + bias and
    ``adapter_up`` (d_out, m) + bias. Subclasses decide where the branch reads and adds."""

    mergeable = False

    def __init__(self, base_layer: nn.Module, router) -> None:
        super().__init__(base_layer, router)
        self.in_features, self.out_features = _features(unwrap(base_layer))
        self.down_w, self.down_b = nn.ParameterDict(), nn.ParameterDict()
        self.up_w, self.up_b = nn.ParameterDict(), nn.ParameterDict()
        self.activation: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    def adapter_names(self) -> list[str]:
        return list(self.down_w.keys())

    def add(self, name: str, config: BottleneckConfig) -> None:
        m = config.size(self.out_features)
        if m <= 0:
            raise ConfigError(
                f"bottleneck size for adapter {name!r} is {self.out_features} // reduction_factor="
                f"{config.reduction_factor} = {m}; use reduction_factor <= {self.out_features} or set bottleneck"
            )
        ref = floating_tensor(self.base_layer)  # blocks have no .weight
        down = nn.Linear(self.in_features, m, device=ref.device, dtype=ref.dtype)  # nn.Linear's default init
        up = nn.Linear(m, self.out_features, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if config.init == "zero":
                for t in (down.bias, up.weight, up.bias):
                    t.zero_()
            elif config.init == "normal":
                for lin in (down, up):
                    nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
                    lin.bias.zero_()
        self.down_w[name], self.down_b[name] = down.weight, down.bias
        self.up_w[name], self.up_b[name] = up.weight, up.bias
        self.activation[name] = config.activation
        self.scaling[name] = float(config.scaling)

    def delete(self, name: str) -> None:
        for d in (self.down_w, self.down_b, self.up_w, self.up_b):
            del d[name]
        del self.activation[name], self.scaling[name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"adapter_down.weight": self.down_w[name], "adapter_down.bias": self.down_b[name],
                "adapter_up.weight": self.up_w[name], "adapter_up.bias": self.up_b[name]}

    # -- the branch s · (U act(D x + b_D) + b_U) -------------------------------------------------
    def _branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """One adapter on every row: (..., d_in) -> (..., d_out), in the adapter's dtype."""
        z = F.linear(x.to(self.down_w[name].dtype), self.down_w[name], self.down_b[name])
        z = ACTIVATIONS[self.activation[name]](z)
        return F.linear(z, self.up_w[name], self.up_b[name]) * self.scaling[name]

    def _branches(self, x: torch.Tensor, route: Route) -> torch.Tensor | None:
        """The summed branches of the route's adapters on this layer (None when there are none)."""
        if route.is_mixed:
            return self._mixed_branch(x, route)
        out = None
        for name in route.active:
            if name in self.down_w:
                b = self._branch(x, name)
                out = b if out is None else out + b
        return out

    def _mixed_branch(self, x: torch.Tensor, route: Route) -> torch.Tensor | None:
        """Each row with its own adapter: gather D, U and biases per row, then two ``bmm``s.

        Tensors are stacked in ``route.names`` order plus a zero slot (``__base__`` rows and
        adapters absent from this layer): a zero branch, so h + 0 = h. Smaller bottlenecks are
        zero-padded to the largest m; act(0) = 0 for every activation, so padding adds nothing.
        """
        names = [n for n in route.names if n in self.down_w]
        if not names:
            return None
        idx = route.index(x.device)  # (B,)
        m = max(self.down_w[n].shape[0] for n in names)
        ref = self.down_w[names[0]]

        def stack(params: nn.ParameterDict, shape: tuple[int, ...]) -> torch.Tensor:
            slots = []
            for n in route.names:
                slots.append(_pad_to(params[n], shape) if n in params else ref.new_zeros(shape))
            slots.append(ref.new_zeros(shape))  # the zero slot
            return torch.stack(slots)[idx]  # (B, *shape)

        D = stack(self.down_w, (m, self.in_features))  # (B, m, d_in)
        bD = stack(self.down_b, (m,))  # (B, m)
        U = stack(self.up_w, (self.out_features, m))  # (B, d_out, m)
        bU = stack(self.up_b, (self.out_features,))  # (B, d_out)
        scale = ref.new_tensor([self.scaling.get(n, 0.0) for n in route.names] + [0.0])[idx]  # (B,)

        x3 = x.to(ref.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d_in)
        z = torch.baddbmm(bD.unsqueeze(1), x3, D.transpose(1, 2))  # (B, T, m)
        z = self._per_row_activation(z, route.names, idx)
        out = torch.baddbmm(bU.unsqueeze(1), z, U.transpose(1, 2)) * scale.view(-1, 1, 1)  # (B, T, d_out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _per_row_activation(self, z: torch.Tensor, names: tuple[str, ...], idx: torch.Tensor) -> torch.Tensor:
        """act(z) with each row's own activation; one call per distinct activation (at most three).

        Zero-slot rows have z = 0 and act(0) = 0 for every activation, so they take any kind.
        """
        present = [self.activation[n] for n in names if n in self.activation]
        kinds = [self.activation.get(n, present[0]) for n in names] + [present[0]]  # per slot
        if len(set(kinds)) == 1:
            return ACTIVATIONS[kinds[0]](z)
        out = z
        for kind in sorted(set(kinds)):
            rows = torch.tensor([k == kind for k in kinds], device=z.device)[idx].view(-1, 1, 1)  # (B, 1, 1)
            out = torch.where(rows, ACTIVATIONS[kind](z), out)
        return out


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad ``t`` at the end of each dim up to ``shape`` (only the bottleneck dim differs)."""
    pad = []
    for have, want in zip(reversed(t.shape), reversed(shape)):
        pad += [0, want - have]
    return F.pad(t, pad) if any(pad) else t


class SequentialAdapterLayer(BottleneckLayer):
    """Houlsby/Pfeiffer: wraps an output projection f; out = h + s · adapter(h), h = f(x).

    Several active adapters apply in sequence, in ``set_adapter([...])`` order (h ← h + a(h)), as
    in stacked language and task adapters (MAD-X). A mixed batch gives each row one adapter.
    """

    def __init__(self, base_layer: nn.Module, router) -> None:
        super().__init__(base_layer, router)
        self.in_features = self.out_features  # the branch reads the projection's output h

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        route = self.route
        if route.is_mixed:
            branch = self._mixed_branch(h, route)
            return h if branch is None else h + branch.to(h.dtype)
        for name in route.active:
            if name in self.down_w:
                h = h + self._branch(h, name).to(h.dtype)
        return h


class ParallelAdapterLayer(BottleneckLayer):
    """Parallel: wraps the FFN f; out = f(x) + s · adapter(x). Several active adapters sum.

    A BERT-style output module (``forward(hidden_states, input_tensor)``) adds the FFN input
    ``input_tensor`` itself before its LayerNorm; there the branch is added to ``input_tensor``.
    """

    def __init__(self, base_layer: nn.Module, router) -> None:
        super().__init__(base_layer, router)
        params = inspect.signature(unwrap(base_layer).forward).parameters
        self.residual_arg = _RESIDUAL_ARG in params
        if self.residual_arg:
            # The branch reads and writes the residual stream, the width of the module's output.
            self.in_features = self.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.residual_arg:
            args, kwargs = list(args), dict(kwargs)
            residual = kwargs[_RESIDUAL_ARG] if _RESIDUAL_ARG in kwargs else args[0]
            branch = self._branches(residual, self.route)
            if branch is not None:
                residual = residual + branch.to(residual.dtype)
            if _RESIDUAL_ARG in kwargs:
                kwargs[_RESIDUAL_ARG] = residual
            else:
                args[0] = residual
            return self.base_layer(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        branch = self._branches(x, self.route)
        return out if branch is None else out + branch.to(out.dtype)


_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
_BLOCK_RE = r"^((?:.*?\.)?(?:{})\.\d+)(?:\.|$)"  # the first numbered layer on the path


def _is_norm(module: nn.Module) -> bool:
    # Model-specific norms (LlamaRMSNorm, T5LayerNorm) are not torch classes; their names say it.
    return isinstance(module, _NORM_TYPES) or (
        type(module).__name__.endswith(("LayerNorm", "RMSNorm")) and not list(module.children())
    )


def _norm_paths(model: nn.Module, adapted: list[str], layers_pattern: str | None) -> list[str]:
    """The norm layers inside every transformer layer that holds one of the ``adapted`` paths."""
    layer_lists = re.escape(layers_pattern) if layers_pattern else "layers|layer|h|block|blocks"
    block_re = re.compile(_BLOCK_RE.format(layer_lists))
    blocks = set()
    for path in adapted:
        found = block_re.match(path)
        if found is None:
            raise ConfigError(
                f"train_layernorms=True but adapted module {path!r} is in no numbered transformer layer; "
                f"set layers_pattern to the name of the layer list, or train_layernorms=False"
            )
        blocks.add(found.group(1))
    paths = [p for p, mod in logical_modules(model)
             if _is_norm(unwrap(mod)) and any(p.startswith(b + ".") for b in blocks)]
    if not paths:
        raise ConfigError(f"train_layernorms=True but no norm layer was found in {sorted(blocks)}; set it to False")
    return paths


def _default_targets(model: nn.Module, variant: str) -> str:
    paths = [p for p, _ in logical_modules(model) if p]
    for attn_out, ffn_out, ffn in _FAMILIES:
        if any(re.fullmatch(ffn_out, p) for p in paths):
            return {"houlsby": f"(?:{attn_out})|(?:{ffn_out})", "pfeiffer": ffn_out, "parallel": ffn}[variant]
    raise ConfigError(
        f"bottleneck adapters have no default targets for {type(model).__name__}: no FFN output like "
        f"mlp.down_proj, mlp.c_proj, layer.N.output.dense or DenseReluDense.wo; pass target_modules=[...] "
        f"naming the sub-layer output projections (variant='parallel': the FFN modules)"
    )


def attach(model, name: str, config: BottleneckConfig) -> None:
    base = model.base_model
    default = None if config.target_modules is not None else _default_targets(base, config.variant)
    if config.variant == "parallel":
        paths = find_targets(base, config, default=default, types=(nn.Module,))
        model.wrap_modules(paths, name, config, ParallelAdapterLayer)
    else:
        paths = find_targets(base, config, default=default, types=LINEAR_TYPES)
        model.wrap_modules(paths, name, config, SequentialAdapterLayer)
    if config.train_layernorms:
        model.wrap_modules(_norm_paths(base, paths, config.layers_pattern), name, config, ModulesToSaveLayer)


# No Hugging Face mapping: PEFT has no bottleneck adapters, so format="peft" is refused.
register("bottleneck", BottleneckConfig, attach)
