"""Hugging Face PEFT's ``adapter_config.json``, both directions.

The tensors already share PEFT's layout (see :mod:`peftlab.formats`); the configs differ. Each
method that PEFT also has registers an :class:`~peftlab.config.HFMapping`; this module only
dispatches on it, so it never names a method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import AdapterConfig, ConfigError, get_method, method_for_peft_type
from ..targeting import ALL_LINEAR, TargetFields

if TYPE_CHECKING:
    from ..model import PeftModel


def is_hf_config(data: dict[str, Any]) -> bool:
    return "peft_type" in data and "method" not in data


def config_to_hf(model: "PeftModel", name: str) -> dict[str, Any]:
    """PEFT's config dict for adapter ``name`` of ``model``."""
    config = model.peft_config[name]
    entry = get_method(config.method)
    if entry.hf is None:
        raise ConfigError(
            f"method {config.method!r} has no Hugging Face PEFT equivalent; save it with format='peftlab'"
        )
    out = entry.hf.to_hf(config, model, name)
    out["base_model_name_or_path"] = getattr(model.base_model.config, "_name_or_path", None) or None
    out.setdefault("revision", None)
    return out


def target_fields_to_hf(config: TargetFields, adapted_paths: list[str]) -> dict[str, Any]:
    """PEFT's targeting fields for a config whose layers sit at ``adapted_paths``.

    "all-linear" (or a method default) is written as the leaf names it hit: PEFT's own rule for
    heads differs, and an explicit list means the same thing in both libraries.
    """
    target = config.target_modules
    if target == ALL_LINEAR or target is None:
        target = sorted({p.rsplit(".", 1)[-1] for p in adapted_paths})
    exclude = config.exclude_modules
    return {
        "target_modules": target if isinstance(target, str) else list(target),
        "exclude_modules": list(exclude) if isinstance(exclude, tuple) else exclude,
        "layers_to_transform": list(config.layers_to_transform) if config.layers_to_transform else None,
        "layers_pattern": config.layers_pattern,
    }


def target_fields_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """Our targeting fields from a PEFT config dict (``layers_to_transform`` may be one int there)."""
    layers = d.get("layers_to_transform")
    pattern = d.get("layers_pattern")
    return {
        "target_modules": d.get("target_modules"),
        "exclude_modules": d.get("exclude_modules"),
        "layers_to_transform": [layers] if isinstance(layers, int) else layers,
        "layers_pattern": (pattern[0] if isinstance(pattern, list) and len(pattern) == 1 else pattern) or None,
    }


def config_from_hf(data: dict[str, Any]) -> AdapterConfig:
    """Our config for a PEFT ``adapter_config.json`` dict."""
    entry = method_for_peft_type(data["peft_type"])
    return entry.hf.from_hf(data)
