"""Data: rows from files and datasets, validation and tokenization, padding, the demo task.

``read_records`` (sources.py) yields ``(where, row)`` pairs; ``encode_records`` (encode.py) turns
them into token ids and labels; ``collate`` (chat.py) pads a batch.
"""

from .chat import IGNORE, Batch, collate, encode_chat, iterate_batches, render_chat
from .encode import KINDS, EncodedData, detect_kind, encode_records
from .sources import DataError, read_records

__all__ = ["IGNORE", "KINDS", "Batch", "DataError", "EncodedData", "collate", "detect_kind", "encode_chat",
           "encode_records", "iterate_batches", "read_records", "render_chat"]
