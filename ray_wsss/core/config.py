"""One dataclass config per job, filled from defaults, then a YAML file, then flags."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import yaml

from ray_wsss.core import storage

T = TypeVar("T")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its flag's help text (and e.g. ``choices``); jobs/_cli.py turns it into a flag."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a dict, accepting ``dash-names``; unknown keys are an error naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    clean = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(clean) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in clean.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_dict(kind, value, f"{source}.{name}")
        elif _is_tuple(kind) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def load(cls: type[T], yaml_uri: str | None = None, overrides: dict[str, Any] | None = None,
         storage_options: storage.StorageOptions | None = None) -> T:
    """Defaults < YAML file (local or s3://) < overrides (None values are ignored)."""
    values: dict[str, Any] = {}
    if yaml_uri:
        loaded = yaml.safe_load(storage.read_bytes(yaml_uri, storage_options)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_uri}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, values, yaml_uri or cls.__name__)


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
