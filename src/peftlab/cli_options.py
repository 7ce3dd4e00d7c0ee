"""Command-line text to typed values: config files and method options, for any ``peftlab`` command.

**Config files.** A command takes ``config: ConfigFile = None`` and gets ``--config FILE`` (YAML,
or JSON by the ``.json`` suffix). The file's keys are the command's parameter names, with dashes or
underscores; its values become the parameters' defaults, so flags given on the command line win.
Unknown keys are an error that lists the valid ones. Relative paths in the file are relative to
the working directory, as on the command line.

**Method options.** ``train --method lora --r 16 --lora-alpha 32 --target-modules q_proj,v_proj``:
the flags are generated from the registered config dataclasses (:func:`method_options`), so a new
method gets its flags with its ``register`` line; :func:`build_method_config` converts the text
to each field's type and names the options of the chosen method when one does not exist. A
command that takes method options is declared with ``context_settings=METHOD_COMMAND`` (click
passes the flags it does not know through as ``ctx.args``) and calls :func:`method_config`; its
config file may then also hold method options (``r: 16``) next to ``method: lora``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Sequence

import typer
import yaml

from .config import AdapterConfig, ConfigError, get_method, registered_methods
from .targeting import ALL_LINEAR

# -- config files ----------------------------------------------------------------------------------

_FILE_METHOD_OPTIONS = "peftlab.method_options"
"""``ctx.meta`` key: method options read from the config file, for :func:`method_config`."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON file, keys with dashes turned into underscores."""
    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values, got a {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _apply_config_file(ctx: typer.Context, param: typer.CallbackParam, path: Optional[Path]) -> Optional[Path]:
    """Eager ``--config`` callback: runs before the other parameters are read, so the file's values
    become their defaults (click's ``default_map``) and explicit flags still win."""
    if path is None:
        return None
    values = read_config_file(path)
    params = {_key(p): p for p in ctx.command.params if p.name not in (param.name, "help")}
    takes_methods = "method" in params
    method_keys = {o.field for opts in method_options().values() for o in opts} if takes_methods else set()
    unknown = sorted(set(values) - set(params) - method_keys)
    if unknown:
        valid = ", ".join(sorted(_dashed(n) for n in params))
        extra = "; and the options of the chosen method (peftlab methods)" if takes_methods else ""
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(_dashed, unknown))}; valid keys: {valid}{extra}")
    defaults = {}
    for key, value in values.items():
        if key in params:
            # A single value for a repeatable option (--prompt) is a list of one, not of characters.
            many = getattr(params[key], "multiple", False)
            defaults[params[key].name] = [value] if many and isinstance(value, str) else value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_FILE_METHOD_OPTIONS] = {k: v for k, v in values.items() if k not in params}
    return path


def _key(param: Any) -> str:
    """A parameter's config-file key: its long flag without dashes (``--json`` -> ``json``, even
    when the Python name is ``as_json``), or an argument's name."""
    flags = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return flags[0][2:].replace("-", "_") if flags else param.name


ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", is_eager=True, callback=_apply_config_file, dir_okay=False,
    help="YAML or JSON file of this command's options (keys: option names); flags given here win.",
)]


def _dashed(name: str) -> str:
    return name.replace("_", "-")


# -- method options --------------------------------------------------------------------------------

METHOD_COMMAND = {"allow_extra_args": True, "ignore_unknown_options": True}
"""``@app.command(context_settings=METHOD_COMMAND)``: unknown flags reach ``ctx.args``."""

METHOD_ALIASES = {"adapter": "bottleneck"}
"""Command-line names that differ from the registry's beyond dashes (``llama-adapter``)."""

_SET_BY_COMMAND = ("task_type",)
"""Config fields a command sets from its task, never from a flag."""

_METAVARS = {str: "TEXT", int: "INT", float: "FLOAT", bool: "BOOL"}
_NONE_WORDS, _TRUE_WORDS, _FALSE_WORDS = {"none", "null"}, {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


@dataclass(frozen=True)
class MethodOption:
    """One field of a method's config, seen as a command-line flag."""

    field: str
    type: Any
    """The field's resolved annotation: ``int``, ``float | None``, ``str | tuple[str, ...] | None``..."""
    default: Any
    doc: str
    """The field's docstring, on one line."""

    @property
    def flag(self) -> str:
        return "--" + _dashed(self.field)

    @property
    def members(self) -> tuple[Any, ...]:
        return typing.get_args(self.type) if isinstance(self.type, types.UnionType) else (self.type,)

    @property
    def metavar(self) -> str:
        names = []
        for m in self.members:
            if typing.get_origin(m) is tuple:
                names.append(_METAVARS.get(typing.get_args(m)[0], "VALUE") + ",...")
            elif m is not type(None):
                names.append(_METAVARS.get(m, "VALUE"))
        return "|".join(names) + ("|none" if type(None) in self.members else "")

    def convert(self, value: Any) -> Any:
        """Text from the command line to the field's type; other values (from a YAML or JSON file)
        pass as they are and the config validates them."""
        if not isinstance(value, str):
            return value
        text, members = value.strip(), self.members
        if type(None) in members and text.lower() in _NONE_WORDS:
            return None
        if bool in members and text.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return text.lower() in _TRUE_WORDS
        for kind in (int, float):
            if kind in members:
                try:
                    return kind(text)
                except ValueError:
                    pass
        sequences = [m for m in members if typing.get_origin(m) is tuple]
        # "q_proj,v_proj" and "q_proj" are lists of names; "all-linear" and ".*proj" are one string.
        if sequences and (str not in members or (text != ALL_LINEAR and re.fullmatch(r"[\w.-]+(,[\w.-]+)*", text))):
            item = typing.get_args(sequences[0])[0]
            try:
                return tuple(item(part.strip()) for part in text.split(",") if part.strip())
            except ValueError:
                pass
        if str in members:
            return text
        raise ConfigError(f"{self.flag} takes {self.metavar}, got {value!r}")


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string under each field) of ``cls`` and its bases, from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # bases first: a subclass's docstring wins
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # defined interactively: no source to read
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@cache
def _options_of(config_cls: type[AdapterConfig]) -> tuple[MethodOption, ...]:
    hints = typing.get_type_hints(config_cls)
    docs = _field_docs(config_cls)
    own = vars(config_cls).get("__annotations__", {})
    fields = [f for f in dataclasses.fields(config_cls) if f.name not in _SET_BY_COMMAND]
    # The method's own fields first, then the shared ones (targets, modules_to_save).
    fields.sort(key=lambda f: f.name not in own)
    return tuple(MethodOption(f.name, hints[f.name], f.default, docs.get(f.name, "")) for f in fields)


def method_options() -> dict[str, tuple[MethodOption, ...]]:
    """The flags of every registered method, by registry name."""
    return {name: _options_of(entry.config_cls) for name, entry in sorted(registered_methods().items())}


def cli_name(method: str) -> str:
    """A registry name as typed on the command line (``llama_adapter`` -> ``llama-adapter``)."""
    return _dashed(method)


def canonical_method(name: str) -> str:
    """The registry name of a command-line method name: dashes or underscores, or an alias."""
    key = name.strip().lower().replace("-", "_")
    key = METHOD_ALIASES.get(key, key)
    if key not in registered_methods():
        known = sorted([cli_name(m) for m in registered_methods()] + list(METHOD_ALIASES))
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(known)} (peftlab methods lists them)")
    return key


def build_method_config(method: str, options: Mapping[str, Any], **fixed: Any) -> AdapterConfig:
    """The config of ``method`` from ``options`` (keys: ``"--lora-alpha"``, ``"lora-alpha"`` or
    ``"lora_alpha"``; values: command-line text or already-typed values), plus ``fixed`` fields the
    command sets itself (``task_type``)."""
    name = canonical_method(method)
    by_field = {o.field: o for o in _options_of(get_method(name).config_cls)}
    values = {}
    for key, value in options.items():
        field = key.lstrip("-").replace("-", "_")
        if field not in by_field:
            close = difflib.get_close_matches(field, by_field, n=1)
            hint = f" (did you mean --{_dashed(close[0])}?)" if close else ""
            raise ConfigError(f"--{_dashed(field)} is not an option of {cli_name(name)}{hint}; {cli_name(name)} takes: "
                              f"{', '.join(o.flag for o in by_field.values())}")
        values[field] = by_field[field].convert(value)
    return get_method(name).config_cls(**values, **fixed)


def parse_method_args(args: Sequence[str]) -> dict[str, str]:
    """``["--r", "16", "--use-rslora", "--lora-alpha=32"]`` -> ``{"r": "16", "use_rslora": "true",
    "lora_alpha": "32"}``: a flag without a value (next to another flag, or last) means true."""
    out, i = {}, 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; method options look like --r 16 or "
                              f"--target-modules=q_proj,v_proj (peftlab methods lists them)")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        out[name.replace("-", "_")] = value
        i += 1
    return out


def method_config(ctx: typer.Context, method: str, **fixed: Any) -> AdapterConfig:
    """The adapter config of a ``METHOD_COMMAND``: method options from ``--config``, overridden by
    the flags on the command line (``ctx.args``)."""
    options = {**ctx.meta.get(_FILE_METHOD_OPTIONS, {}), **parse_method_args(ctx.args)}
    return build_method_config(method, options, **fixed)


def describe_methods(only: str | None = None, width: int = 100) -> str:
    """``peftlab methods``: each method, its one-line summary, its flags with types, defaults and docs."""
    names = [canonical_method(only)] if only else list(method_options())
    aliases = {v: k for k, v in METHOD_ALIASES.items()}
    blocks = []
    for name in names:
        entry = get_method(name)
        module_doc = (sys.modules[entry.config_cls.__module__].__doc__ or "").strip()
        summary = " ".join(module_doc.split("\n\n")[0].split()) or entry.config_cls.__name__
        title = cli_name(name) + (f" (alias: {aliases[name]})" if name in aliases else "")
        lines = [f"{title}: {summary}"]
        for o in _options_of(entry.config_cls):
            lines.append(f"  {o.flag} {o.metavar}  (default: {_show(o.default)})")
            lines += textwrap.wrap(o.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# -- dataclass options ------------------------------------------------------------------------------

def dataclass_options(cls: type, *, into: str, exclude: Sequence[str] = ()) -> typing.Callable:
    """Decorator: the fields of dataclass ``cls`` become ``--options`` of a typer command (type,
    default and help from the field's annotation, default and docstring), handed to the command
    bundled as one ``cls`` instance in its parameter ``into``. So ``peftlab train --lr 3e-4`` is
    generated from :class:`~peftlab.train.TrainArgs` and cannot drift from it; ``exclude`` names
    fields the command declares itself (its own option, e.g. a ``Path``): when the command has a
    parameter of that name, its value (a path as a string) fills the field too, so the bundle is
    validated with it (``--save-every`` needs ``--output-dir``)."""
    hints, docs = typing.get_type_hints(cls), _field_docs(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in exclude]

    def decorate(command: typing.Callable) -> typing.Callable:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != into]
        field_names = {f.name for f in dataclasses.fields(cls)}
        shared = [name for name in exclude if name in field_names and name in signature.parameters]
        added = []
        for f in fields:
            kind = hints[f.name]
            if isinstance(kind, types.UnionType):  # typer reads Optional[X], not X | None
                kind = Optional[next(m for m in typing.get_args(kind) if m is not type(None))]
            flag = "--" + _dashed(f.name)
            if kind is bool:  # a switch both ways: --lean-loss / --no-lean-loss
                flag += "/--no-" + _dashed(f.name)
            option = typer.Option(f.default, flag, help=docs.get(f.name, ""))
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from_own = {n: os.fspath(kwargs[n]) if isinstance(kwargs[n], os.PathLike) else kwargs[n] for n in shared}
            bundled = cls(**{f.name: kwargs.pop(f.name) for f in fields}, **from_own)
            return command(*args, **{into: bundled}, **kwargs)

        wrapper.__name__, wrapper.__doc__, wrapper.__module__ = command.__name__, command.__doc__, command.__module__
        # Resolved annotations (typer reads them from the signature; strings would be looked up in
        # this module), all keyword-only: those may follow parameters with defaults in any order.
        resolved = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=resolved.get(p.name, p.annotation))
               for p in own]
        wrapper.__signature__ = signature.replace(parameters=own + added, return_annotation=None)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate
