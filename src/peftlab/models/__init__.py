"""Models to adapt: pretrained ones (:func:`load`) and tiny random ones (:func:`tiny`)."""

from .loaders import ALIASES, TASKS, load, load_tokenizer
from .tiny import TINY_ARCHS, tiny

__all__ = ["ALIASES", "TASKS", "TINY_ARCHS", "load", "load_tokenizer", "tiny"]
