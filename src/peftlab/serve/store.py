"""Adapters by name for the server: where each lives on disk, a CPU copy, which are on the model.

Three tiers, each a superset of the next:

* **registered** — name → adapter directory, always inside one of the allowed roots (the
  ``--adapters`` directories). Names are plain (:func:`~peftlab.routing.check_adapter_name`: no
  separators, no ``..``) and the directory is checked after ``Path.resolve()`` (symlinks
  followed), so no request can make the server read outside the roots.
* **cached** — the adapter's config and tensors as read from disk, on CPU; least recently used
  first out beyond ``max_cached``. Re-attaching an evicted adapter reads no file.
* **resident** — attached to the model, its tensors on the model's device, ready for per-row
  routing (``adapter_names=[...]``, the mixed-batch kernels). At most ``max_resident``: attaching
  one more evicts the least recently used adapter that no running request holds
  (:meth:`AdapterStore.acquire` / :meth:`AdapterStore.release` count holders).

Threads: the model is only touched from the engine thread (``acquire``, ``release``, ``preload``,
``unregister``, ``forward``); ``register`` (which reads files) and the lookups may run on any
thread, a lock guards the name table.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..config import AdapterConfig
from ..formats import CONFIG_NAME, AdapterLoadError
from ..model import PeftModel, read_adapter_dir
from ..prompts import prepend_prompts
from ..routing import BASE, Route, RoutingError, check_adapter_name

BASE_ID = "base"
"""The model id that selects the plain base model; no adapter may take this name."""


class AdapterNotFound(KeyError):
    """No adapter is registered under this name (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class AdapterExists(ValueError):
    """The name is taken (HTTP 409)."""


class AdapterPathError(ValueError):
    """An adapter name or path that would leave the allowed directories (HTTP 403)."""


class AdapterBusy(RuntimeError):
    """Every resident adapter is held by a running request; try again when one finishes."""


class AdapterStore:
    """Registered, cached and resident adapters on one base model (see the module docstring).

    Args:
        model: the base ``transformers`` model. It becomes a :class:`~peftlab.PeftModel` when the
            first adapter is attached; :attr:`model` is always the one to run.
        roots: allowed directories. Each is an adapter directory (registered under its folder
            name) or a folder of adapter directories (each registered under its own name).
        named: more adapter directories, registered under the given names (``{"sql":
            "runs/sql/adapter"}``: training runs all save to a folder called ``adapter``).
        max_resident: adapters attached to the model at once.
        max_cached: adapters whose tensors are kept on CPU.
    """

    def __init__(self, model: nn.Module, roots: Iterable[str | os.PathLike] = (), *,
                 named: Mapping[str, str | os.PathLike] | None = None, max_resident: int = 8,
                 max_cached: int = 64) -> None:
        if isinstance(model, PeftModel):
            raise TypeError("AdapterStore attaches adapters itself from their directories; pass the plain base "
                            "model (as models.load returns it) and the adapter directories, not a PeftModel")
        if max_resident < 1 or max_cached < max_resident:
            raise ValueError(f"need 1 <= max_resident <= max_cached, got max_resident={max_resident}, "
                             f"max_cached={max_cached}")
        self.model = model
        self.max_resident, self.max_cached = max_resident, max_cached
        self._roots: list[Path] = []
        self._named: dict[str, Path] = {}
        self._dirs: dict[str, Path] = {}
        self._cached: OrderedDict[str, tuple[AdapterConfig, dict[str, torch.Tensor]]] = OrderedDict()
        self._holders: OrderedDict[str, int] = OrderedDict()  # resident name -> running requests; LRU first
        self._doomed: set[str] = set()  # unregistered, detached when the last holder releases it
        self._lock = threading.Lock()
        for root in roots:
            self._add_root(Path(root))
        for name, directory in (named or {}).items():
            self._add_root(Path(directory), name)

    # -- names and directories (any thread) ----------------------------------------------------
    def _add_root(self, root: Path, name: str | None = None) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"adapter directory {str(root)!r} does not exist; pass an adapter directory "
                                    f"or a folder of them")
        if name is not None and not _is_adapter_dir(root):
            raise FileNotFoundError(f"{str(root)!r} (for adapter {name!r}) has no {CONFIG_NAME}; name an adapter "
                                    f"directory, as saved by save_pretrained()")
        self._roots.append(root.resolve())
        if name is not None:
            self._named[name] = root.resolve()
            self._claim(name, root.resolve())
            return
        found = [root] if _is_adapter_dir(root) else sorted(d for d in root.iterdir() if _is_adapter_dir(d))
        for directory in found:
            self._claim(directory.name, directory.resolve())

    def _claim(self, name: str, directory: Path) -> None:
        _check_name(name, directory)
        with self._lock:
            if name in self._dirs or name in self._doomed:
                where = self._dirs.get(name, "an adapter still being unloaded")
                raise AdapterExists(f"adapter name {name!r} is taken (by {where}); "
                                    f"rename {directory} or DELETE /v1/adapters/{name} first")
            self._dirs[name] = directory

    def resolve(self, name: str, path: str | os.PathLike | None = None) -> Path:
        """The directory adapter ``name`` would load from: ``path`` (absolute, or relative to a root),
        else ``<root>/<name>``; refused unless it lies inside a root."""
        _check_name(name, path)
        if path is None:
            candidates = [self._named[name]] if name in self._named else []
            candidates += [r for r in self._roots if r.name == name and _is_adapter_dir(r)]
            candidates += [r / name for r in self._roots if (r / name).exists()]
        else:
            path = Path(path)
            candidates = [path] if path.is_absolute() else [r / path for r in self._roots if (r / path).exists()]
        if not candidates:
            raise FileNotFoundError(f"no adapter directory {str(path or name)!r} under the adapter roots "
                                    f"{[str(r) for r in self._roots]}; copy it there first")
        directory = candidates[0].resolve()
        if not any(directory == r or directory.is_relative_to(r) for r in self._roots):
            raise AdapterPathError(f"{str(path or name)!r} resolves to {directory}, outside the adapter roots "
                                   f"{[str(r) for r in self._roots]}; only adapters under them can be loaded")
        return directory

    def register(self, name: str, path: str | os.PathLike | None = None) -> Path:
        """Register ``name`` (see :meth:`resolve`) and read its files into the CPU cache, so a
        broken directory fails here rather than in the first request that uses it."""
        directory = self.resolve(name, path)
        config, tensors = read_adapter_dir(directory, allow_pickle=False)
        self._claim(name, directory)
        with self._lock:
            self._cache(name, config, tensors)
        return directory

    def names(self) -> list[str]:
        """Registered adapter names, sorted."""
        with self._lock:
            return sorted(self._dirs)

    def require(self, name: str) -> Path:
        """The directory of registered adapter ``name``; :class:`AdapterNotFound` if there is none."""
        with self._lock:
            if name not in self._dirs:
                raise self._not_found(name)
            return self._dirs[name]

    @property
    def resident(self) -> list[str]:
        """Adapters attached to the model, least recently used first."""
        with self._lock:
            return list(self._holders)

    def _not_found(self, name: str) -> AdapterNotFound:
        return AdapterNotFound(f"model {name!r} does not exist; models: {', '.join([BASE_ID] + sorted(self._dirs))} "
                               f"(GET /v1/models), or load it with POST /v1/adapters")

    def _cache(self, name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
        self._cached[name] = (config, tensors)
        self._cached.move_to_end(name)
        while len(self._cached) > self.max_cached:
            self._cached.popitem(last=False)

    # -- the model (engine thread) ---------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """Make ``name`` resident and count one more running request holding it.

        Raises :class:`AdapterNotFound` if it is not registered, :class:`AdapterBusy` if the
        model is full of adapters that running requests hold, ``AdapterLoadError`` if its files do
        not fit the model.
        """
        with self._lock:
            if name not in self._dirs:
                raise self._not_found(name)
            directory = self._dirs[name]
            cached = self._cached.get(name)
        if name in self._holders:
            self._holders[name] += 1
            self._holders.move_to_end(name)
            return
        if len(self._holders) >= self.max_resident:
            idle = next((n for n, held in self._holders.items() if held == 0), None)
            if idle is None:
                raise AdapterBusy(f"all {self.max_resident} resident adapters are in use (--max-resident)")
            self._detach(idle)
        if cached is None:
            cached = read_adapter_dir(directory, allow_pickle=False)
            with self._lock:
                self._cache(name, *cached)
        try:
            self._attach(name, *cached)
        except Exception as exc:
            raise AdapterLoadError(f"adapter {name!r} ({directory}) does not fit the base model "
                                   f"{type(_base(self.model)).__name__}: {exc}") from exc
        self._holders[name] = 1

    def release(self, name: str) -> None:
        """One running request holding ``name`` is done with it."""
        self._holders[name] -= 1
        if self._holders[name] == 0 and name in self._doomed:
            self._detach(name)
            with self._lock:
                self._doomed.discard(name)

    def preload(self, name: str) -> bool:
        """Attach ``name`` now if a slot is free (checks that it fits the model); False if every
        slot is held by running requests, in which case it attaches on first use."""
        try:
            self.acquire(name)
        except AdapterBusy:
            return False
        self.release(name)
        return True

    def unregister(self, name: str) -> None:
        """Forget ``name``: new requests for it get :class:`AdapterNotFound`; it leaves the model
        now, or when the last running request holding it finishes."""
        with self._lock:
            if name not in self._dirs:
                raise self._not_found(name)
            del self._dirs[name]
            self._cached.pop(name, None)
            if self._holders.get(name):
                self._doomed.add(name)
                return
        if name in self._holders:
            self._detach(name)

    def _attach(self, name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
        # Served, not trained: adapters take the base's dtype, so a bf16 base's layers compute in
        # bf16 throughout (fp32 copies are for the optimizer's small updates).
        if isinstance(self.model, PeftModel):
            self.model.add_adapter(name, config, autocast_adapter_dtype=False)
        else:
            self.model = PeftModel(self.model, config, name, autocast_adapter_dtype=False)
        try:
            adapters = self.model.model_adapters
            needs = getattr(adapters[name], "extra_inputs", ()) if name in adapters else ()
            if needs:  # e.g. multitask prompts: task_ids
                raise AdapterLoadError(
                    f"adapter {name!r} is a {config.method} adapter, which needs {list(needs)} in every forward "
                    f"(one per row), and OpenAI requests have no field for them; run it from Python with "
                    f"PeftModel.generate(..., {needs[0]}=...)"
                )
            self.model.load_adapter_state_dict(name, tensors)
        except Exception:
            self.model.delete_adapter(name)
            raise
        self.model.eval()  # new adapter layers start in training mode (dropout on)
        # Served adapters never train, and frozen ones let the mixed-batch kernels reuse their
        # stacked copy (ops.StackCache). add_adapter() makes every adapter trainable that was not
        # loaded from a file with is_trainable=False, so all are frozen again after each attach.
        for resident in self.model.peft_config:
            for tensor in self.model.adapter_state_dict(resident).values():
                tensor.requires_grad_(False)

    def _detach(self, name: str) -> None:
        self.model.delete_adapter(name)
        del self._holders[name]

    def with_virtual_tokens(self, adapters: Sequence[str], **inputs: Any) -> dict[str, Any]:
        """The inputs of a first forward over a fresh cache, one model id per row: rows whose
        adapter adds virtual tokens (prompt tuning, P-tuning) get them in front of their text,
        with ``attention_mask`` and ``position_ids`` to match — :func:`peftlab.prompts.prepend_prompts`,
        as ``PeftModel.forward`` and ``generate`` do. Unchanged when no row has such an adapter.

        The prompts then live in the KV cache, so later steps go through :meth:`forward`, which
        adds nothing. Pass no ``position_ids``: with virtual tokens they are counted over the mask.
        """
        if not isinstance(self.model, PeftModel) or not self.model.model_adapters:
            return inputs
        return prepend_prompts(self.model.base_model, self.model.model_adapters, self._route(adapters), inputs)

    def forward(self, adapters: Sequence[str], **inputs: Any) -> Any:
        """Run the model with one model id (``"base"`` or an adapter name) per row of the batch.

        Inputs reach the base model as given, under the per-row route that every adapter layer and
        the attention hook (prefixes, LLaMA-Adapter's gated prompts) read: virtual tokens are not
        added here (see :meth:`with_virtual_tokens`), just as ``PeftModel.generate`` adds them
        once and then steps the base model.
        """
        route = self._route(adapters)
        if not isinstance(self.model, PeftModel):
            return self.model(**inputs)
        with self.model.router.use(route):
            return self.model.base_model(**inputs)

    def _route(self, adapters: Sequence[str]) -> Route:
        names = tuple(BASE if a == BASE_ID else a for a in adapters)
        resident = self.model.peft_config if isinstance(self.model, PeftModel) else {}
        missing = sorted(set(names) - {BASE} - set(resident))
        if missing:  # acquire() attaches adapters before any forward
            raise RoutingError(f"adapters {missing} are not resident; acquire() them first")
        return Route(per_example=names)


def _base(model: nn.Module) -> nn.Module:
    return model.base_model if isinstance(model, PeftModel) else model


def _is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def _check_name(name: str, where: Any) -> None:
    try:
        check_adapter_name(name)
    except RoutingError as exc:
        raise AdapterPathError(f"{exc} (adapter at {where})" if where else str(exc)) from None
    if name == BASE_ID:
        raise AdapterPathError(f"adapter name {BASE_ID!r} is reserved for the base model; rename {where or 'it'}")
