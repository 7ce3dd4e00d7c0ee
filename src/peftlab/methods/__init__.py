"""One file per method. Importing this package registers every method."""

from . import lora, prefix, prompt  # noqa: F401  (each module registers its method)
from . import bottleneck  # noqa: F401  (registers "bottleneck")
from . import ia3, loha  # noqa: F401  (register "ia3", "loha")
from . import multitask, ptuning  # noqa: F401  (register "multitask", "ptuning")
from . import llama_adapter  # noqa: F401  (registers "llama_adapter")
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
