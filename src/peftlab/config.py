"""Adapter configurations and the method registry.

Every method is one registry entry: its config class, the function that attaches it to a model,
and (optionally) how its config maps to Hugging Face PEFT's ``adapter_config.json``. The core
looks methods up here by the ``method`` field and never names one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from .model import PeftModel


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every method's config: a frozen dataclass, validated at construction.

    Subclasses set the class attribute ``method`` (the registry name written to JSON) and
    override :meth:`validate`. Lists given for sequence fields are stored as tuples, so a config
    is hashable and cannot change after it is built.
    """

    method: ClassVar[str] = ""

    task_type: str | None = None
    """What the base model does ("CAUSAL_LM", "SEQ_CLS", ...): recorded for the model card and
    for Hugging Face PEFT, which needs it to pick its wrapper class. With "SEQ_CLS" and no
    ``modules_to_save``, the classification head ("classifier" or "score") trains too."""
    modules_to_save: tuple[str, ...] | None = None
    """Modules (names or dotted suffixes) trained in full, one copy per adapter, and saved with it:
    typically a freshly initialised classification head."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid field. Subclasses extend this."""

    @property
    def effective_modules_to_save(self) -> tuple[str, ...]:
        if self.modules_to_save is not None:
            return self.modules_to_save
        return ("classifier", "score") if self.task_type == "SEQ_CLS" else ()

    # -- JSON round-trip ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "AdapterConfig":
        """Build the config named by ``data["method"]``; unknown fields are an error."""
        data = dict(data)
        method = data.pop("method", None)
        if method is None:
            raise ConfigError(
                f"config has no 'method' field (keys: {sorted(data)}); "
                f"add one of {sorted(_REGISTRY)}"
            )
        cls = get_method(method).config_cls
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown field(s) {unknown} for {cls.__name__}; valid fields: {sorted(names)}"
            )
        return cls(**data)

    @staticmethod
    def from_json(text: str) -> "AdapterConfig":
        return AdapterConfig.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with some fields changed (configs are never mutated)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class HFMapping:
    """How a method's config maps to Hugging Face PEFT's ``adapter_config.json``."""

    peft_type: str
    to_hf: Callable[[AdapterConfig, "PeftModel", str], dict[str, Any]]
    from_hf: Callable[[dict[str, Any]], AdapterConfig]
    key_prefix: str = "base_model.model."
    """Prefix of module-path tensor keys in PEFT's weights file for this method."""


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type[AdapterConfig]
    attach: Callable[["PeftModel", str, AdapterConfig], None]
    """Insert the method's layers for adapter ``name`` into the model (idempotent per module)."""
    hf: HFMapping | None = None


_REGISTRY: dict[str, MethodEntry] = {}


def register(
    name: str,
    config_cls: type[AdapterConfig],
    attach: Callable[["PeftModel", str, AdapterConfig], None],
    *,
    hf: HFMapping | None = None,
) -> None:
    """Register a method. Called once, at import, by ``methods/<name>.py``."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is registered twice")
    if config_cls.method != name:
        raise ValueError(f"{config_cls.__name__}.method is {config_cls.method!r}, expected {name!r}")
    _REGISTRY[name] = MethodEntry(name, config_cls, attach, hf)


def get_method(name: str) -> MethodEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; registered methods: {sorted(_REGISTRY)}") from None


def registered_methods() -> dict[str, MethodEntry]:
    """All registered methods, by name."""
    return dict(_REGISTRY)


def method_for_peft_type(peft_type: str) -> MethodEntry:
    for entry in _REGISTRY.values():
        if entry.hf is not None and entry.hf.peft_type == peft_type:
            return entry
    known = sorted(e.hf.peft_type for e in _REGISTRY.values() if e.hf)
    raise ConfigError(f"Hugging Face PEFT type {peft_type!r} is not supported; supported: {known}")
