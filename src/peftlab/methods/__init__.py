"""One file per method. Importing this package registers every method."""

from . import lora  # noqa: F401  (registers "lora")
from .lora import LoraConfig

__all__ = ["LoraConfig"]
