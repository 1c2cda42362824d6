"""One dataclass config per job, filled from defaults, then a YAML file, then flags."""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any, TypeVar

import yaml

from ray_wsss.core import storage

T = TypeVar("T")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its flag's help text; jobs/_cli.py turns it into a flag.

    Checked when a config is built (:func:`from_dict`, :func:`load`) against the field's type and
    these optional ``metadata`` keys: ``choices`` (allowed values), ``min`` / ``max`` (inclusive
    bounds), ``gt`` (an exclusive lower bound, e.g. ``gt=0`` for a learning rate). The bounds apply
    to each item of a tuple field.
    """
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


class ConfigError(ValueError):
    """A config value of the wrong type, out of range or not among the choices; says where it came from."""


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config",
              origins: dict[str, str] | None = None) -> T:
    """Build ``cls`` from a dict, accepting ``dash-names``; every value is checked against its field.

    ``source`` names where the values come from (a YAML file, a section of one); ``origins`` may
    name another source per key (a flag). Unknown keys, wrong types, values out of range and the
    config's own cross-field checks (its ``__post_init__``) raise :class:`ConfigError`.
    """
    kwargs = check_fields(cls, values, source, origins)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # the config's __post_init__: checks between fields, sections
        raise ConfigError(f"{source}: {err}") from err


def check_fields(cls: type, values: dict[str, Any], source: str,
                 origins: dict[str, str] | None = None) -> dict[str, Any]:
    """``values`` (dash-names allowed) checked against ``cls``'s fields and converted to their types
    (list -> tuple, int -> float); a partial set is fine, as for a pipeline's per-stage section."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(values).__name__} {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    clean = _dash_to_underscore(values, source)
    unknown = sorted(set(clean) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return {name: _checked(fields[name], hints[name], value, (origins or {}).get(name, source))
            for name, value in clean.items()}


def load(cls: type[T], yaml_uri: str | None = None, overrides: dict[str, Any] | None = None,
         storage_options: storage.StorageOptions | None = None) -> T:
    """Defaults < YAML file (local or s3://) < overrides (flags; None values are ignored).

    A dict override of a nested section (``storage``) updates the YAML's section key by key.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if yaml_uri:
        try:
            loaded = yaml.safe_load(storage.read_bytes(yaml_uri, storage_options)) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{yaml_uri} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_uri}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(_dash_to_underscore(loaded, yaml_uri))
    for name, value in _dash_to_underscore(overrides or {}, "overrides").items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(values.get(name), dict):
            value = {**values[name], **value}
            origins[name] = f"{yaml_uri} and flags"
        else:
            origins[name] = "--" + name.replace("_", "-")
        values[name] = value
    return from_dict(cls, values, yaml_uri or cls.__name__, origins)


def _dash_to_underscore(values: dict[str, Any], source: str) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in clean:
            raise ConfigError(f"{source}: {name!r} is given twice (as {name} and {name.replace('_', '-')})")
        clean[name] = value
    return clean


class _Mismatch(Exception):
    """A value does not fit its field; the caller says which field and what is allowed."""


def _checked(field: dataclasses.Field, kind: Any, value: Any, source: str) -> Any:
    """``value`` converted to the field's type (list -> tuple, int -> float), or ConfigError."""
    value = _onto_default(field, unwrap_optional(kind), value, source)
    try:
        return _convert(kind, value, field.metadata, f"{source}: {field.name}")
    except _Mismatch:
        raise ConfigError(f"{source}: {field.name} = {value!r} is not allowed; expected "
                          f"{describe(kind, field.metadata)}") from None


def _onto_default(field: dataclasses.Field, kind: Any, value: Any, source: str) -> Any:
    """A nested section given as a mapping updates the field's own default key by key (a stage may default
    its ``crf:`` section differently from another stage); ``section: true/false`` sets its ``enabled``."""
    if not dataclasses.is_dataclass(kind) or field.default_factory is dataclasses.MISSING:
        return value
    has_switch = any(f.name == "enabled" for f in dataclasses.fields(kind))
    if isinstance(value, bool) and has_switch:
        value = {"enabled": value}
    if not isinstance(value, dict):
        return value
    default = field.default_factory()
    base = {f.name: getattr(default, f.name) for f in dataclasses.fields(kind)}
    return {**base, **_dash_to_underscore(value, f"{source}: {field.name}")}


def nested_sections(cls: type) -> dict[str, type]:
    """{field name: dataclass} of ``cls``'s nested config sections (``crf``, ``storage``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: unwrap_optional(hints[f.name]) for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(unwrap_optional(hints[f.name]))}


def _convert(kind: Any, value: Any, metadata: Any, where: str) -> Any:
    inner = unwrap_optional(kind)
    if value is None:
        if inner is not kind:
            return None
        raise _Mismatch
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if isinstance(value, dict):
            return from_dict(inner, value, where)
        raise _Mismatch
    if _is_tuple(inner):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        items = _item_kinds(inner, len(value))
        return tuple(_scalar(item, v, metadata) for item, v in zip(items, value))
    if inner is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    return _scalar(inner, value, metadata)


def _item_kinds(kind: Any, length: int) -> list[Any]:
    args = typing.get_args(kind)
    if not args:
        raise TypeError(f"tuple fields need item types, e.g. tuple[float, ...]; got {kind}")
    if len(args) == 2 and args[1] is Ellipsis:
        return [args[0]] * length
    if len(args) != length:
        raise _Mismatch
    return list(args)


def _scalar(kind: Any, value: Any, metadata: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):  # strictly: "no", 0 and 1 are not booleans
            raise _Mismatch
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _Mismatch
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise _Mismatch
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise _Mismatch
    else:
        raise TypeError(f"config fields of type {kind} are not supported")
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise _Mismatch
    if ("min" in metadata and value < metadata["min"]) or ("max" in metadata and value > metadata["max"]) \
            or ("gt" in metadata and value <= metadata["gt"]):
        raise _Mismatch
    return value


_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), dict: ("a mapping", "mappings")}


def describe(kind: Any, metadata: Any = None) -> str:
    """What a field accepts, in words: "a number in [0, 1] or null", "a list of integers >= 1"."""
    metadata = metadata or {}
    inner = unwrap_optional(kind)
    if dataclasses.is_dataclass(inner):
        keys = [f.name for f in dataclasses.fields(inner)]
        text = f"a mapping with keys among {keys}"
        if "enabled" in keys:
            text = f"true or false (its `enabled`), or {text}"
    elif _is_tuple(inner):
        args = typing.get_args(inner)
        text = f"a list of {_NAMES[args[0]][1]}{_bounds(metadata)}"
        if not (len(args) == 2 and args[1] is Ellipsis):
            text += f" of length {len(args)}"
    elif metadata.get("choices") is not None:
        text = f"one of {list(metadata['choices'])}"
    else:
        text = _NAMES[inner][0] + _bounds(metadata)
    return text + (" or null" if inner is not kind else "")


def _bounds(metadata: Any) -> str:
    low = ("(", metadata["gt"]) if "gt" in metadata else ("[", metadata["min"]) if "min" in metadata else None
    high = metadata.get("max")
    if low and high is not None:
        return f" in {low[0]}{low[1]}, {high}]"
    if low:
        return f" {'>' if low[0] == '(' else '>='} {low[1]}"
    return f" <= {high}" if high is not None else ""


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict for YAML/JSON, with secrets left out."""
    out = dataclasses.asdict(cfg)
    if "storage" in out:
        out["storage"] = {k: v for k, v in out["storage"].items() if k not in ("access_key", "secret_key")}
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _is_tuple(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple or kind is tuple


def unwrap_optional(kind: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind
