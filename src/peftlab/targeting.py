"""Which modules a config hits, and a small description of the architecture.

Target specs follow Hugging Face PEFT's habits:

* a list of names: a module matches when its path equals a name or ends with ``"." + name``
  (``"q_proj"`` and ``"self_attn.q_proj"`` both hit ``model.layers.0.self_attn.q_proj``);
* a string: a regular expression that must match the whole path;
* ``"all-linear"``: every ``nn.Linear``/``Conv1D`` except the output or classifier head.

``exclude_modules`` removes matches (same forms), ``layers_to_transform`` keeps only the given
layer indices. Paths are *logical*: an already-wrapped module is seen at its original path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .config import ConfigError

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
ALL_LINEAR = "all-linear"

# Heads that map hidden states to task outputs; "all-linear" never adapts them.
_HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "cls", "out_proj_head"}
_LAYER_RE = re.compile(r"\.(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")

TargetSpec = str | Iterable[str] | None

_QV = ("q_proj", "v_proj")
QUERY_VALUE: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "opt", "bart", "gptj"), _QV),
    "phi3": ("qkv_proj",), "gpt2": ("c_attn",), "gpt_neox": ("query_key_value",), "falcon": ("query_key_value",),
    "bert": ("query", "value"), "roberta": ("query", "value"), "distilbert": ("q_lin", "v_lin"),
    "t5": ("q", "v"), "mt5": ("q", "v"),
}
"""model_type -> the attention's query and value projections (a fused qkv projection where the model
has one): the default ``target_modules`` of the low-rank methods, as in the LoRA paper."""


def query_value_targets(model: nn.Module) -> tuple[str, ...] | None:
    """:data:`QUERY_VALUE` for ``model``'s architecture; None when it is not listed."""
    return QUERY_VALUE.get(getattr(getattr(model, "config", None), "model_type", None))


@dataclass(frozen=True)
class TargetFields:
    """Config fields shared by every method that wraps modules picked by name.

    Mixed into method configs (``class LoraConfig(TargetFields, AdapterConfig)``).
    """

    target_modules: str | tuple[str, ...] | None = None
    """Names, dotted suffixes, a regex (one string) or "all-linear"; None = the method's default."""
    exclude_modules: str | tuple[str, ...] | None = None
    """Modules never adapted, in the same forms as ``target_modules``."""
    layers_to_transform: tuple[int, ...] | None = None
    """Only adapt modules inside these decoder/encoder layer indices."""
    layers_pattern: str | None = None
    """Name of the layer list (e.g. "layers", "h") used to read layer indices; default: common names."""

    def validate_targets(self) -> None:
        if self.layers_to_transform is not None:
            bad = [i for i in self.layers_to_transform if not isinstance(i, int) or i < 0]
            if bad:
                raise ConfigError(f"layers_to_transform must hold non-negative ints, got {bad}")
        for fname in ("target_modules", "exclude_modules"):
            spec = getattr(self, fname)
            if isinstance(spec, str) and spec != ALL_LINEAR:
                try:
                    re.compile(spec)
                except re.error as exc:
                    raise ConfigError(f"{fname}={spec!r} is not a valid regular expression: {exc}") from None


def unwrap(module: nn.Module) -> nn.Module:
    """The original module under any number of adapter wrappers."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


def logical_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(path, module) for the model's own modules, adapter internals hidden.

    A wrapped module appears once, at its original path, as the outermost wrapper. Adapter
    parameters living inside wrappers (``lora_A`` etc.) are not listed.
    """

    def walk(prefix: str, module: nn.Module):
        yield prefix, module
        if hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
            # An adapter wrapper: descend only into what the base model owned.
            inner = unwrap(module)
            for name, child in inner.named_children():
                yield from walk(f"{prefix}.{name}" if prefix else name, child)
            return
        for name, child in module.named_children():
            yield from walk(f"{prefix}.{name}" if prefix else name, child)

    yield from walk("", model)


def physical_path(model: nn.Module, path: str) -> str:
    """Where the module at logical ``path`` lives now: ``.base_layer`` inserted under each adapter
    wrapper on the way (a norm inside a wrapped FFN block sits one level deeper than its path)."""
    module, parts = model, []
    for name in path.split(".") if path else []:
        while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module) and name not in module._modules:
            module = module.base_layer
            parts.append("base_layer")
        module = module.get_submodule(name)
        parts.append(name)
    return ".".join(parts)


def layer_index(path: str, layers_pattern: str | None = None) -> int | None:
    """Index of the transformer layer a module path lies in, or None."""
    if layers_pattern:
        m = re.search(rf"\.{re.escape(layers_pattern)}\.(\d+)(?:\.|$)", "." + path)
    else:
        m = _LAYER_RE.search("." + path)
    return int(m.group(1)) if m else None


def _head_paths(model: nn.Module) -> set[str]:
    heads = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for path, module in logical_modules(model):
        if not path:
            continue
        if (out is not None and unwrap(module) is unwrap(out)) or path.split(".")[-1] in _HEAD_NAMES:
            heads.add(path)
    return heads


def matches(path: str, spec: TargetSpec) -> bool:
    """Whether ``path`` is selected by ``spec``: one string is a regex over the whole path, a list
    holds names or dotted suffixes, None selects nothing."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def find_targets(
    model: nn.Module,
    fields: TargetFields,
    *,
    default: TargetSpec = None,
    types: tuple[type[nn.Module], ...] = LINEAR_TYPES,
) -> list[str]:
    """Paths of the modules ``fields`` selects, of one of ``types``. Never empty.

    Raises :class:`ConfigError` listing the candidate modules when nothing matches.
    """
    spec = fields.target_modules if fields.target_modules is not None else default
    if spec is None:
        raise ConfigError(
            f"target_modules is not set and there is no default for {type(model).__name__}; "
            f"pass target_modules=[...] or 'all-linear'"
        )
    heads = _head_paths(model) if spec == ALL_LINEAR else set()
    wanted_layers = set(fields.layers_to_transform) if fields.layers_to_transform is not None else None

    found = []
    for path, module in logical_modules(model):
        if not path or not isinstance(unwrap(module), types):
            continue
        if spec == ALL_LINEAR:
            if not isinstance(unwrap(module), LINEAR_TYPES) or path in heads:
                continue
        elif not matches(path, spec):
            continue
        if fields.exclude_modules is not None and matches(path, fields.exclude_modules):
            continue
        if wanted_layers is not None and layer_index(path, fields.layers_pattern) not in wanted_layers:
            continue
        found.append(path)
    if not found:
        raise ConfigError(_no_match_message(model, spec, fields, types))
    return found


def _no_match_message(model, spec, fields, types) -> str:
    names = sorted(
        {".".join(p.split(".")[-2:]) for p, m in logical_modules(model) if p and isinstance(unwrap(m), types)}
    )
    shown = ", ".join(names[:24]) + (", ..." if len(names) > 24 else "")
    extra = ""
    if fields.layers_to_transform is not None:
        extra = f" within layers {list(fields.layers_to_transform)}"
    if fields.exclude_modules is not None:
        extra += f" after excluding {fields.exclude_modules!r}"
    kinds = "/".join(t.__name__ for t in types)
    return (
        f"target_modules={spec!r} matched no {kinds} module in {type(model).__name__}{extra}; "
        f"{kinds} modules here: {shown or 'none'}"
    )


@dataclass(frozen=True)
class ArchInfo:
    """The few facts about an architecture that methods need, read from its config and modules."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    is_encoder_decoder: bool
    layer_paths: tuple[str, ...] = field(default=())
    """Paths of the transformer blocks (for the decoder stack in an encoder-decoder)."""


def _first_attr(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def describe(model: nn.Module) -> ArchInfo:
    """Read layer count, widths and head counts from a ``transformers`` model."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    num_layers = _first_attr(cfg, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first_attr(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first_attr(cfg, "num_attention_heads", "n_head", "num_heads")
    if num_layers is None or hidden is None or heads is None:
        raise ConfigError(f"cannot read layers/hidden size/heads from {type(model.config).__name__}")
    kv_heads = _first_attr(cfg, "num_key_value_heads", default=heads)
    head_dim = _first_attr(cfg, "head_dim", "d_kv", default=hidden // heads)
    layer_paths = []
    for path, module in logical_modules(model):
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and path:
            layer_paths = [f"{path}.{i}" for i in range(num_layers)]
    return ArchInfo(
        model_type=getattr(model.config, "model_type", type(model).__name__),
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        is_encoder_decoder=bool(getattr(model.config, "is_encoder_decoder", False)),
        layer_paths=tuple(layer_paths),
    )
