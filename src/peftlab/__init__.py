"""peftlab: parameter-efficient fine-tuning for ``transformers`` models."""

from .config import AdapterConfig, ConfigError, register, registered_methods
from .formats import AdapterLoadError
from .methods import BottleneckConfig, IA3Config, LoHaConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from .methods import MultitaskPromptConfig, PTuningConfig
from .methods import LlamaAdapterConfig
from .model import PeftModel, get_peft_model
from .routing import BASE, RoutingError

__all__ = [
    "AdapterConfig",
    "AdapterLoadError",
    "BASE",
    "BottleneckConfig",
    "ConfigError",
    "IA3Config",
    "LlamaAdapterConfig",
    "LoHaConfig",
    "LoraConfig",
    "MultitaskPromptConfig",
    "PeftModel",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "RoutingError",
    "get_peft_model",
    "registered_methods",
    "register",
]
__version__ = "0.1.0"
