"""Typed configs: dataclasses built from presets plus ``key=value`` overrides, strictly checked.

One idiom for every config in the project: types are checked here, when a config is built from a
dict or from the command line (``from_dict``, ``apply_overrides``); ranges and choices are checked in
the dataclass's ``__post_init__`` with ``require``. Both raise ``ConfigError`` naming the key, what
was expected and what was given: a typo in a long run's command line fails at start instead of being
ignored, the failure mode of YAML merges that accept any key.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar, Union

from core.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config key or value is wrong; the message says which and why."""


def require(condition: bool, message: str) -> None:
    """Range / choice check of a config's ``__post_init__``: raise ConfigError(message) unless condition."""
    if not condition:
        raise ConfigError(message)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and for strings from the command line, parse) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {tp}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(v, elem, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported annotation {tp}")


def from_dict(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and wrong types raise ConfigError."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here: {', '.join(prefix + k for k in types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def stored_config(cls: type[T], values: dict[str, Any], source: str) -> T:
    """``from_dict`` for a config read back from a checkpoint: a refusal names the file and the likely reason
    (another version of the project wrote it, whose options this one checks differently or no longer has)."""
    try:
        return from_dict(cls, values)
    except ConfigError as e:
        raise ConfigError(f"{source}: this version refuses the configuration stored in it ({e}); it was probably "
                          "written by another version of the project: retrain it with this version, or use the "
                          "version that wrote it") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-able nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of ``cfg`` with ``a.b.c=value`` overrides applied (dotted keys into nested dataclasses)."""
    tree = dataclasses.asdict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        node, parts = tree, key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{item}'")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(node))}")
        if isinstance(node[parts[-1]], dict):
            raise ConfigError(f"config key '{key}' is a section; set one of its fields instead")
        node[parts[-1]] = value.strip()
    return from_dict(type(cfg), tree)


