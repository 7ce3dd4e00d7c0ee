"""PeftModel: a frozen ``transformers`` model plus named adapters.

Methods add their layers through :meth:`PeftModel.wrap_modules`; everything else here —
routing, state, save/load, merge — works on the :class:`~peftlab.layers.AdapterLayer` protocol
and never names a method.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from . import formats
from .config import AdapterConfig, ConfigError, get_method
from .formats import hf_peft
from .layers import AdapterLayer, ModulesToSaveLayer
from . import attention
from .lean import lean_forward
from .ops.loss import HeadContext, check_chunk_size
from .prompts import prepend_prompts
from .routing import BASE, Route, Router, RoutingError, check_adapter_name
from .targeting import logical_modules, matches, physical_path, unwrap

DEFAULT = "default"
logger = logging.getLogger(__name__)
_WRAPPER_SEGMENT = ".base_layer"


class PeftModel(nn.Module):
    """Wraps a ``transformers`` model; the base weights are frozen, adapters are trainable.

    ``forward``/``generate`` pass every argument through to the base model, plus
    ``adapter_names=[...]``: one adapter name (or ``"__base__"``) per row of the batch.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT, *,
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.base_model = model
        self.router = Router()
        # Model-level adapters (one module per adapter): virtual tokens (prompts.PromptAdapter) or
        # per-layer keys/values and gated attention (attention.AttentionAdapter).
        self.model_adapters = nn.ModuleDict()
        self.peft_config: dict[str, AdapterConfig] = {}
        self._frozen_adapters: set[str] = set()
        # Inside lean_loss(): {"chunk_size": rows per head call, None for the device's default}; None = off.
        self._lean: dict | None = None
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        # Unknown attributes (config, device, get_input_embeddings, ...) come from the base model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: AdapterConfig, *, autocast_adapter_dtype: bool = True) -> None:
        """Attach a new adapter. It is trainable; it becomes active only via :meth:`set_adapter`.

        ``autocast_adapter_dtype`` (as in Hugging Face PEFT): on an fp16/bf16 base the adapter's
        weights are kept in fp32, so the optimizer's small updates are not rounded away; the layers
        still compute in the base's dtype where they can (weights cast down, not activations up).
        False keeps them in the base's dtype."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(
                f"adapter {adapter_name!r} already exists (adapters: {sorted(self.peft_config)}); "
                f"pick another name or delete_adapter({adapter_name!r}) first"
            )
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be an AdapterConfig such as LoraConfig, got {type(config).__name__}")
        get_method(config.method).attach(self, adapter_name, config)
        self.wrap_modules(self._modules_to_save_paths(config), adapter_name, config, ModulesToSaveLayer)
        self.peft_config[adapter_name] = config
        if autocast_adapter_dtype:
            self._upcast_adapter(adapter_name)
        self._update_trainable()

    def _upcast_adapter(self, adapter_name: str) -> None:
        """fp16/bf16 tensors of adapter ``adapter_name`` to fp32, in place (the Parameter objects
        stay). Copies of whole modules (``modules_to_save``) keep the module's dtype: they replace
        the base module and must compute as it does."""
        tensors = [t for _, layer in self.adapter_layers(adapter_name) if not isinstance(layer, ModulesToSaveLayer)
                   for t in layer.adapter_state(adapter_name).values()]
        if adapter_name in self.model_adapters:
            tensors += list(self.model_adapters[adapter_name].parameters())
        for t in tensors:
            if t.dtype in (torch.float16, torch.bfloat16):
                t.data = t.data.float()

    def wrap_modules(self, paths: Sequence[str], adapter_name: str, config: AdapterConfig,
                     layer_cls: type[AdapterLayer], **layer_kwargs: Any) -> None:
        """Give each module at ``paths`` adapter ``adapter_name``, wrapping it in ``layer_cls`` once.

        A module already wrapped by ``layer_cls`` gains one more adapter; a module wrapped by another
        method's layer is wrapped again (layers stack, each handling its own adapters).
        ``layer_kwargs`` go to ``layer.add`` as they are: per-path arguments the config alone cannot
        give (a method calls this once per group of paths that share them).
        """
        for path in [physical_path(self.base_model, p) for p in paths]:
            module = self.base_model.get_submodule(path)
            if not isinstance(module, layer_cls):
                module = layer_cls(module, self.router)
                self.base_model.set_submodule(path, module)
            module.add(adapter_name, config, **layer_kwargs)

    def add_model_adapter(self, adapter_name: str, module: nn.Module) -> None:
        """Register a model-level adapter: a ``PromptAdapter`` or an ``AttentionAdapter``."""
        if isinstance(module, attention.AttentionAdapter):
            attention.install(self.base_model, self.router, self.model_adapters)
        self.model_adapters[adapter_name] = module

    def _modules_to_save_paths(self, config: AdapterConfig) -> list[str]:
        wanted = config.effective_modules_to_save
        if not wanted:
            return []
        # Like Hugging Face PEFT, names that are absent are skipped ("classifier" or "score"), but a
        # list that matches nothing at all is a mistake worth reporting.
        paths = [p for p, _ in logical_modules(self.base_model) if p and matches(p, wanted)]
        if not paths:
            raise ConfigError(
                f"modules_to_save={list(wanted)} matched no module in {type(self.base_model).__name__}; "
                f"top-level modules: {[n for n, _ in self.base_model.named_children()]}"
            )
        return paths

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known([adapter_name])
        for _, layer in self.adapter_layers(adapter_name):
            if adapter_name in layer.merged:
                raise RoutingError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
            layer.delete(adapter_name)
        if adapter_name in self.model_adapters:
            del self.model_adapters[adapter_name]
        del self.peft_config[adapter_name]
        self._frozen_adapters.discard(adapter_name)
        self.router.default = Route(tuple(n for n in self.router.default.active if n != adapter_name))

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make one adapter (or several, summed) serve every forward by default."""
        names = (adapter_name,) if isinstance(adapter_name, str) else tuple(adapter_name)
        self._check_known(names)
        self.router.default = Route(active=names)

    @property
    def active_adapters(self) -> list[str]:
        return list(self.router.default.active)

    @property
    def active_adapter(self) -> str | None:
        active = self.router.default.active
        return active[0] if active else None

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block."""
        merged = sorted({n for _, layer in self.adapter_layers() for n in layer.merged})
        if merged:
            raise RoutingError(f"adapter(s) {merged} are merged into the base weights; call unmerge_adapter() first")
        with self.router.use(Route()):
            yield

    def _check_known(self, names: Sequence[str]) -> None:
        for n in names:
            if n not in self.peft_config:
                raise RoutingError(f"unknown adapter {n!r}; adapters: {sorted(self.peft_config)}")

    # -- declared state -------------------------------------------------------------------------
    def adapter_layers(self, adapter_name: str | None = None) -> list[tuple[str, AdapterLayer]]:
        """(logical path, layer) of every adapter layer, or of those holding ``adapter_name``."""
        out = []
        for path, module in self.base_model.named_modules():
            if isinstance(module, AdapterLayer) and (adapter_name is None or adapter_name in module.adapter_names()):
                out.append((path.replace(_WRAPPER_SEGMENT, ""), module))
        return out

    def adapter_paths(self, adapter_name: str) -> list[str]:
        return [p for p, _ in self.adapter_layers(adapter_name)]

    def adapter_state_dict(self, adapter_name: str = DEFAULT, *, to_save: bool = False) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s trainable tensors keyed ``<module path>.<tensor>`` (live, not
        copies); with ``to_save``, what its files hold instead (model-level adapters may differ)."""
        self._check_known([adapter_name])
        state = {
            f"{path}.{key}": t
            for path, layer in self.adapter_layers(adapter_name)
            for key, t in layer.adapter_state(adapter_name).items()
        }
        if adapter_name in self.model_adapters:  # top-level keys
            module = self.model_adapters[adapter_name]
            state.update(module.state_to_save() if to_save else module.adapter_state())
        return state

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors into adapter ``adapter_name``; keys and shapes must match exactly."""
        expected = self.adapter_state_dict(adapter_name, to_save=True)
        state = self._drop_saved_base_tensors(state)
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise formats.AdapterLoadError(
                f"adapter {adapter_name!r} does not fit this model: {len(missing)} tensor(s) missing "
                f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]}); "
                f"was it trained on a different base model or target_modules?"
            )
        for key, target in expected.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise formats.AdapterLoadError(
                    f"tensor {key}: file has shape {tuple(state[key].shape)}, model expects "
                    f"{tuple(target.shape)} (was the adapter trained on another base model?)"
                )
        top_level = {k for k in expected if "." not in k}
        with torch.no_grad():
            for key, target in expected.items():
                if key not in top_level:
                    target.copy_(state[key].to(dtype=target.dtype, device=target.device))
        if top_level:
            self.model_adapters[adapter_name].load_saved_state({k: state[k] for k in top_level})

    def _drop_saved_base_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face PEFT saves the whole base embedding when embeddings are targeted; accept it
        when it equals ours (the usual case) and refuse a resized or retrained one."""
        kept = {}
        for key, tensor in state.items():
            if ".base_layer." not in key:
                kept[key] = tensor
                continue
            try:
                ours = self.base_model.get_parameter(key)
            except AttributeError:
                kept[key] = tensor  # reported as unexpected below
                continue
            if ours.shape != tensor.shape or not torch.allclose(ours.detach().cpu(), tensor.to(ours.dtype)):
                raise formats.AdapterLoadError(
                    f"the adapter file carries base weights {key} that differ from this model's "
                    f"(resized or retrained vocabulary?); load it onto the base model it was trained with"
                )
        return kept

    def _update_trainable(self) -> None:
        for name in self.peft_config:
            for t in self.adapter_state_dict(name).values():
                t.requires_grad_(name not in self._frozen_adapters)

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared tensors counted once.

        A quantised base layer (:mod:`peftlab.quant`) keeps its weight as packed buffers; it counts
        as the ``out_features × in_features`` weights it stands for.
        """
        seen, trainable, total = set(), 0, 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        total += sum(m.in_features * m.out_features for m in self.modules()
                     if isinstance(m, nn.Linear) and hasattr(m, "dequantize"))
        return trainable, total

    get_nb_trainable_parameters = trainable_parameters

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- forward ----------------------------------------------------------------------------------
    def _route_for(self, adapter_names: Sequence[str] | None, batch_size: int | None) -> Route:
        if adapter_names is None:
            return self.router.route  # the active adapters, or the base model inside disable_adapter()
        if isinstance(adapter_names, str):
            raise RoutingError("adapter_names takes one name per row, e.g. ['a', '__base__', 'b'], not a string")
        names = tuple(adapter_names)
        self._check_known([n for n in set(names) if n != BASE])
        if batch_size is not None and len(names) != batch_size:
            raise RoutingError(f"adapter_names has {len(names)} entries but the batch has {batch_size} rows")
        return Route(per_example=names)

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> int | None:
        for key in ("input_ids", "inputs_embeds", "input_features", "pixel_values"):
            if kwargs.get(key) is not None:
                return kwargs[key].shape[0]
        return args[0].shape[0] if args and torch.is_tensor(args[0]) else None

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self.router.use(self._route_for(adapter_names, self._batch_size(args, kwargs))) as route:
            if self.model_adapters:
                kwargs = prepend_prompts(self.base_model, self.model_adapters, route, self._as_kwargs(args, kwargs))
                args = ()
            if self._lean is not None and len(args) <= 1:
                kwargs, args = self._as_kwargs(args, kwargs), ()
                # The loss's gradients are made inside this route's scope; only per-row routes need
                # the rows of each chunk of labelled positions routed again for the head.
                out = lean_forward(self.base_model, kwargs, chunk_size=self._lean["chunk_size"],
                                   head_context=self._rows_context(route))
                if out is not None:
                    return out
            return self.base_model(*args, **kwargs)

    @contextmanager
    def lean_loss(self, enabled: bool = True, chunk_size: int | None = None) -> Iterator[None]:
        """Inside the block, a causal-LM forward with ``labels`` returns ``loss`` and ``logits=None``.

        The loss (and its gradients) equal the model's own, but come from the labelled positions
        only, ``chunk_size`` of them per call of the output head (None: 256 on the CPU, 4096 on a
        GPU; :func:`peftlab.ops.loss.default_chunk_size`), so the (B, T, vocab) logits and their
        gradient never exist (:mod:`peftlab.lean`). Calls it cannot serve — no labels,
        sequence classification, encoder-decoders, logits the model changes after its head — run
        as usual. ``enabled=False`` turns it off inside the block. See :attr:`lean_loss_enabled`.
        """
        check_chunk_size(chunk_size, "lean_loss")
        previous, self._lean = self._lean, {"chunk_size": chunk_size} if enabled else None
        try:
            yield
        finally:
            self._lean = previous

    @property
    def lean_loss_enabled(self) -> bool:
        """Whether forwards run inside an enabled :meth:`lean_loss` block."""
        return self._lean is not None

    def _rows_context(self, route: Route) -> HeadContext | None:
        """For a per-row route: given the batch row of each position in a chunk, route those rows."""
        if not route.is_mixed:
            return None
        names = route.per_example
        return lambda rows: self.router.use(Route(per_example=tuple(names[i] for i in rows.tolist())))

    @staticmethod
    def _as_kwargs(args: tuple, kwargs: dict) -> dict:
        if len(args) > 1:
            raise TypeError("pass inputs by keyword (input_ids=..., attention_mask=...) when prompt adapters are attached")
        return {"input_ids": args[0], **kwargs} if args else kwargs

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        route = self._route_for(adapter_names, self._batch_size(args, kwargs))
        ids = None
        if self.model_adapters:
            # Virtual tokens go in front of each of the caller's rows, before generate expands them.
            kwargs = self._as_kwargs(args, kwargs)
            args, ids = (), kwargs.get("input_ids")
            with self.router.use(route):
                kwargs = prepend_prompts(self.base_model, self.model_adapters, route, kwargs, for_generate=True)
        if route.is_mixed:
            # Beam search and multiple samples repeat each row; the route must repeat with them.
            repeat = max(kwargs.get("num_beams", 1) or 1, 1) * max(kwargs.get("num_return_sequences", 1) or 1, 1)
            route = Route(per_example=tuple(n for n in route.per_example for _ in range(repeat)))
        with self.router.use(route):
            out = self.base_model.generate(*args, **kwargs)
        if ids is None or "input_ids" in kwargs or getattr(self.base_model.config, "is_encoder_decoder", False):
            return out
        # Given only embeddings, decoder-only generate returns just the new tokens; put the caller's
        # ids back in front so the output looks the same with or without prompts.
        return torch.cat([ids.repeat_interleave(out.shape[0] // ids.shape[0], dim=0), out], dim=1)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **options: Any) -> None:
        """Checkpoint the base model's layers; the recomputed forward sees the original route.

        ``transformers.Trainer(activation_checkpointing=True)`` calls this name; were it missing here,
        ``__getattr__`` would hand the call to the base model and the recomputation would lose the
        route. ``options`` (``every_n_layers``, ``offload``) reach the base model as they are.
        """
        kwargs = {"use_reentrant": False, "context_fn": self.router.checkpoint_context}
        kwargs.update(activation_checkpointing_kwargs or {})
        # Newer transformers renamed gradient_checkpointing_enable (keeping it as a deprecated alias).
        if hasattr(self.base_model, "activation_checkpointing_enable"):
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options: Any) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    # -- merging -----------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold the adapters' ΔW into the base weights (default: the active adapters). Idempotent."""
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self._check_known(names)
        for name in names:
            layers = self.adapter_layers(name)
            not_mergeable = sorted({type(layer).__name__ for _, layer in layers if not layer.mergeable})
            if name in self.model_adapters:
                not_mergeable.append(type(self.model_adapters[name]).__name__)
            if not_mergeable:
                method = self.peft_config[name].method
                raise ConfigError(
                    f"adapter {name!r} ({method}) cannot be merged: {not_mergeable} add computation the base "
                    f"weights cannot express; keep it unmerged, or use a mergeable method such as LoRA"
                )
            self._untie(layers)
            for _, layer in layers:
                layer.dequantize_base()  # a quantised base merges into its dense copy
                layer.merge(name)

    def _untie(self, layers: Sequence[tuple[str, AdapterLayer]]) -> None:
        """Give each layer about to merge its own copy of a weight it shares with another module.

        With tied embeddings (SmolLM2: ``embed_tokens.weight is lm_head.weight``) merging ΔW into
        the shared tensor would change the other module too. The merged model is untied instead,
        and its config says so, so ``tie_weights()`` or a reload does not tie it back.
        """
        holders = Counter(id(p) for m in self.base_model.modules() for p in m._parameters.values() if p is not None)
        for _, layer in layers:
            base = unwrap(layer.base_layer)
            weight = getattr(base, "weight", None)
            if isinstance(weight, nn.Parameter) and holders[id(weight)] > 1:
                base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
                config = getattr(self.base_model, "config", None)
                if getattr(config, "tie_word_embeddings", False):
                    config.tie_word_embeddings = False

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()
            layer.restore_base()

    def merge_and_unload(self, requantize: bool = False) -> nn.Module:
        """Merge the active adapters and return the plain base model (no adapter layers left).

        On a quantised base (:mod:`peftlab.quant`) each merged layer is dequantised: it comes back
        as a dense ``nn.Linear`` holding W + ΔW, or with ``requantize=True`` quantised again with
        the base's scheme. The largest absolute weight change re-quantising causes is logged (INFO).
        """
        self.merge_adapter()
        if requantize:
            errors = [e for _, layer in self.adapter_layers() if (e := layer.requantize_base()) is not None]
            if errors:
                logger.info("merge_and_unload: re-quantised %d merged layer(s); largest absolute weight change %.4g",
                            len(errors), max(errors))
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging; return the plain base model."""
        # Deepest first, so a wrapper nested inside a wrapped block is still reachable; the inner
        # layers of a stack (paths ending in .base_layer) go with their outermost wrapper.
        for path, module in reversed(list(self.base_model.named_modules())):
            if isinstance(module, AdapterLayer) and not path.endswith(_WRAPPER_SEGMENT):
                self.base_model.set_submodule(path, unwrap(module))
        self.model_adapters.clear()
        attention.uninstall(self.base_model)
        self.peft_config.clear()
        self.router.default = Route()
        return self.base_model

    # -- save / load -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None,
                        format: str = "peftlab") -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

        ``default`` goes in ``save_directory`` itself, any other adapter in a subfolder named after
        it (Hugging Face PEFT's layout). ``format="peft"`` writes PEFT's config instead of ours.
        """
        if format not in formats.FORMATS:
            raise ValueError(f"format must be one of {formats.FORMATS}, got {format!r}")
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        self._check_known(names)
        for name in names:
            directory = Path(save_directory) if name == DEFAULT else Path(save_directory) / name
            config = hf_peft.config_to_hf(self, name) if format == "peft" else self.peft_config[name].to_dict()
            hf = get_method(self.peft_config[name].method).hf
            formats.write_adapter(directory, config, self.adapter_state_dict(name, to_save=True),
                                  key_prefix=hf.key_prefix if hf else formats.KEY_PREFIX)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = DEFAULT,
                        is_trainable: bool = False, allow_pickle: bool = False, *,
                        autocast_adapter_dtype: bool = True) -> "PeftModel":
        """Attach the adapter saved in ``model_id`` (a directory, either format) to ``model``."""
        config, tensors = read_adapter_dir(model_id, allow_pickle)
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft_model._load_tensors(adapter_name, tensors, is_trainable)
        except BaseException:
            peft_model.unload()  # leave the caller's model as it was
            raise
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False, *, autocast_adapter_dtype: bool = True) -> None:
        """Attach one more saved adapter under ``adapter_name`` (not activated)."""
        config, tensors = read_adapter_dir(model_id, allow_pickle)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            self._load_tensors(adapter_name, tensors, is_trainable)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], is_trainable: bool) -> None:
        if adapter_name in self.model_adapters:
            self.model_adapters[adapter_name].prepare_load(set(tensors), is_trainable)
        self.load_adapter_state_dict(adapter_name, tensors)
        if not is_trainable:
            self._frozen_adapters.add(adapter_name)
        self._update_trainable()


def read_adapter_dir(model_id: str | os.PathLike, allow_pickle: bool) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a saved adapter (ours or Hugging Face PEFT's files), not yet attached."""
    data, tensors = formats.read_adapter(model_id, allow_pickle=allow_pickle)
    try:
        config = hf_peft.config_from_hf(data) if hf_peft.is_hf_config(data) else AdapterConfig.from_dict(data)
    except (ConfigError, TypeError, KeyError) as exc:
        raise formats.AdapterLoadError(f"{model_id}/{formats.CONFIG_NAME}: {exc}") from None
    return config, tensors


def get_peft_model(model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT, *,
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    """Freeze ``model`` and attach one adapter made by ``config``'s method. On an fp16/bf16 base the
    adapter's weights are fp32 unless ``autocast_adapter_dtype=False`` (see :meth:`PeftModel.add_adapter`)."""
    return PeftModel(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
