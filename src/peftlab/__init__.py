"""peftlab: parameter-efficient fine-tuning for ``transformers`` models."""

from .config import AdapterConfig, ConfigError, register, registered_methods
from .formats import AdapterLoadError
from .methods import LoraConfig
from .model import PeftModel, get_peft_model
from .routing import BASE, RoutingError

__all__ = [
    "AdapterConfig",
    "AdapterLoadError",
    "BASE",
    "ConfigError",
    "LoraConfig",
    "PeftModel",
    "RoutingError",
    "get_peft_model",
    "registered_methods",
    "register",
]
__version__ = "0.1.0"
