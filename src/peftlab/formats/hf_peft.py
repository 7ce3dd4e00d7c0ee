"""Hugging Face PEFT's ``adapter_config.json``, both directions.

The tensors already share PEFT's layout (see :mod:`peftlab.formats`); the configs differ. Each
method that PEFT also has registers an :class:`~peftlab.config.HFMapping`; this module only
dispatches on it, so it never names a method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import AdapterConfig, ConfigError, get_method, method_for_peft_type

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


def config_from_hf(data: dict[str, Any]) -> AdapterConfig:
    """Our config for a PEFT ``adapter_config.json`` dict."""
    entry = method_for_peft_type(data["peft_type"])
    return entry.hf.from_hf(data)
