"""Serving many adapters on one base model: an OpenAI-compatible HTTP server.

* :mod:`.store` — adapters by name: registered directories, CPU copies, an LRU of resident ones;
* :mod:`.engine` — continuous batching, one forward per decode step across adapters;
* :mod:`.kv`, :mod:`.sampling`, :mod:`.text` — the batch's KV cache, next-token choice, streamed text;
* :mod:`.app`, :mod:`.schema` — the FastAPI routes and OpenAI's request/response shapes;
* :mod:`.server`, :mod:`.cli` — building it, running it (``peftlab serve``).

FastAPI and uvicorn come with the ``serve`` extra: ``pip install peftlab[serve]``.
"""

from .engine import Chunk, Completion, Engine, EngineStopped, QueueFull
from .sampling import SamplingParams
from .store import BASE_ID, AdapterBusy, AdapterExists, AdapterNotFound, AdapterPathError, AdapterStore

__all__ = [
    "AdapterBusy",
    "AdapterExists",
    "AdapterNotFound",
    "AdapterPathError",
    "AdapterStore",
    "BASE_ID",
    "Chunk",
    "Completion",
    "Engine",
    "EngineStopped",
    "QueueFull",
    "SamplingParams",
]
