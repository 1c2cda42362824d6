"""What every job shares: flags built from the job's config dataclass, Ray start-up, the summary line.

Flags mirror the config fields (``batch_size`` -> ``--batch-size``); ``--config YAML`` sets any of
them, and flags given on the command line win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ray_wsss.core import config as config_lib
from ray_wsss.core.errors import WsssError
from ray_wsss.core.storage import StorageOptions

T = TypeVar("T")


def parse_config(cls: type[T], description: str, argv: list[str] | None = None) -> T:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # defaults: _add_flag
    parser.add_argument("--config", help="YAML file (local or s3://) with any of the options below")
    hints = typing.get_type_hints(cls)
    sections = config_lib.nested_sections(cls)
    for field in dataclasses.fields(cls):
        if field.name in sections or config_lib.unwrap_optional(hints[field.name]) is dict:
            continue  # nested sections get prefixed flags below; dict fields are per-stage YAML sections
        _add_flag(parser, field, config_lib.unwrap_optional(hints[field.name]))
    for field in dataclasses.fields(cls):
        if field.name in sections and field.name != "storage":  # storage has the --s3-* flags
            _add_section_flags(parser, field, sections[field.name])
    s3 = parser.add_argument_group("S3-compatible storage (default: the AWS environment variables)")
    s3.add_argument("--s3-endpoint", help="endpoint URL, e.g. http://minio:9000 (AWS_ENDPOINT_URL)")
    s3.add_argument("--s3-region", help="region (AWS_REGION)")
    s3.add_argument("--s3-access-key", help="access key id (AWS_ACCESS_KEY_ID)")
    s3.add_argument("--s3-secret-key", help="secret key (AWS_SECRET_ACCESS_KEY)")
    args = vars(parser.parse_args(argv))
    options = StorageOptions(args.pop("s3_endpoint"), args.pop("s3_region"),
                             args.pop("s3_access_key"), args.pop("s3_secret_key"))
    yaml_uri = args.pop("config")
    overrides = _nest({k: v for k, v in args.items() if v is not None}, sections)
    storage_flags = {k: v for k, v in dataclasses.asdict(options).items() if v is not None}
    if storage_flags and any(f.name == "storage" for f in dataclasses.fields(cls)):
        overrides["storage"] = storage_flags  # on top of the YAML's `storage:` section, key by key
    try:
        return config_lib.load(cls, yaml_uri, overrides, options)
    except (ValueError, TypeError, WsssError) as err:  # a bad value, or a --config file that cannot be read
        parser.error(str(err))


def _add_section_flags(parser: argparse.ArgumentParser, field: dataclasses.Field, section: type) -> None:
    """A nested section's fields as ``--<section>-<field>`` flags; its ``enabled`` switch as ``--<section>``.

    The defaults shown are the stage's own (its field's default section), not the section class's.
    """
    group = parser.add_argument_group(f"{field.name}: (YAML section `{field.name}:`)")
    hints = typing.get_type_hints(section)
    default = field.default_factory()
    for sub in dataclasses.fields(section):
        dest = field.name if sub.name == "enabled" else f"{field.name}.{sub.name}"
        _add_flag(group, sub, config_lib.unwrap_optional(hints[sub.name]), dest, getattr(default, sub.name))


def _nest(values: dict[str, Any], sections: dict[str, type]) -> dict[str, Any]:
    """Flag values of nested sections (dest ``crf.iterations``, switch ``crf``) -> {"crf": {...}}."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        section, _, field = key.partition(".")
        if field:
            nested.setdefault(section, {})[field] = value
        elif section in sections and section != "storage":
            nested.setdefault(section, {})["enabled"] = value
        else:
            nested[key] = value
    return nested


def _add_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, kind: Any, dest: str | None = None,
              default: Any = dataclasses.MISSING) -> None:
    dest = dest or field.name
    flag = "--" + dest.replace("_", "-").replace(".", "-")
    help_text = field.metadata.get("help", "")
    if default is not dataclasses.MISSING:
        pass
    elif field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = None
    if "default" not in help_text:  # some help texts already say how the default is chosen
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
    if {"min", "max", "gt"} & set(field.metadata):
        help_text += f"; {config_lib.describe(kind, field.metadata)}"
    choices = field.metadata.get("choices")
    if kind is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        parser.add_argument(flag, dest=dest, nargs="+", type=item, default=None, help=help_text)
    elif kind in (int, float, str):
        parser.add_argument(flag, dest=dest, type=kind, default=None, choices=choices, help=help_text)
    else:
        raise TypeError(f"no flag type for {field.name}: {kind}")


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local one."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ray_wsss.harness.cluster import LOCAL_RUNTIME_ENV, private_auth_token

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    private_auth_token(create=not address)  # Ray would write a new local cluster's token world-readable
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a local Ray: no dashboard unless ray[default] is installed
        ray.init(log_to_driver=True, runtime_env=LOCAL_RUNTIME_ENV)
    private_auth_token(create=False)  # whatever Ray wrote or found, readable by this user only


def print_summary(summary: dict[str, Any]) -> None:
    """Every job's last stdout line: one JSON object.

    Ray is shut down first: worker logs stream in asynchronously and would land after it.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.flush()
    sys.stdout.flush()
    print(json.dumps(summary, default=str, sort_keys=True), flush=True)
