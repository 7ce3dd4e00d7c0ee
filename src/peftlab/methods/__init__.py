"""One file per method. Importing this package imports, and so registers, every method."""

from .bottleneck import BottleneckConfig
from .ia3 import IA3Config
from .llama_adapter import LlamaAdapterConfig
from .loha import LoHaConfig
from .lora import LoraConfig
from .multitask import MultitaskPromptConfig
from .ptuning import PTuningConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig

__all__ = ["BottleneckConfig", "IA3Config", "LlamaAdapterConfig", "LoHaConfig", "LoraConfig", "MultitaskPromptConfig", "PTuningConfig", "PrefixTuningConfig", "PromptTuningConfig"]
