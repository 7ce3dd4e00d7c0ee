"""Data: chat templates, completion-only labels, batching, and the built-in demo task."""

from .chat import Batch, collate, encode_chat, iterate_batches

__all__ = ["Batch", "collate", "encode_chat", "iterate_batches"]
