"""URIs and their filesystems: a local path or ``s3://bucket/prefix``, read and written through pyarrow.

The stage commit protocol built on these is in :mod:`ray_wsss.core.commit`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs

from ray_wsss.core.errors import WsssError


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """How to reach an S3-compatible store. Unset fields fall back to the AWS environment."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None

    def resolved(self) -> StorageOptions:
        env = os.environ
        return StorageOptions(
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            access_key=self.access_key or env.get("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or env.get("AWS_SECRET_ACCESS_KEY"),
        )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Return a pyarrow filesystem and the path inside it for ``uri``.

    S3 goes through s3fs (fsspec) wrapped for pyarrow, so Ray Data, Ray Train and our own I/O
    share one client configuration. Listing caches are off: stages read what others just wrote.
    """
    if is_s3(uri):
        import s3fs

        opts = (options or StorageOptions()).resolved()
        client_kwargs: dict[str, Any] = {}
        if opts.region:
            client_kwargs["region_name"] = opts.region
        fs = s3fs.S3FileSystem(
            key=opts.access_key,
            secret=opts.secret_key,
            endpoint_url=opts.endpoint_url,
            client_kwargs=client_kwargs,
            use_listings_cache=False,
            skip_instance_cache=True,
        )
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _wrap_io_error(uri: str, action: str, err: Exception) -> WsssError:
    return WsssError(f"cannot {action} {uri}: {type(err).__name__}: {err}")


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as err:
        raise _wrap_io_error(uri, "stat", err) from err


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        raise WsssError(f"file not found: {uri}") from err
    except Exception as err:
        raise _wrap_io_error(uri, "read", err) from err


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole file atomically: a temporary name, then a rename (a single PUT on S3)."""
    fs, path = resolve(uri, options)
    try:
        fs.create_dir(posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path), recursive=True)
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except Exception as err:
        raise _wrap_io_error(uri, "write", err) from err


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, options))


def write_json(uri: str, obj: Any, options: StorageOptions | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), options)


def list_files(uri: str, options: StorageOptions | None = None, suffix: str = "") -> list[str]:
    """Files below ``uri`` (recursive), as paths relative to it, sorted. Missing dir -> []."""
    fs, path = resolve(uri, options)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except Exception as err:
        raise _wrap_io_error(uri, "list", err) from err
    rel = [posixpath.relpath(i.path, path) if is_s3(uri) else os.path.relpath(i.path, path)
           for i in infos if i.type == pafs.FileType.File]
    return sorted(r for r in rel if r.endswith(suffix))


def delete(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a file or a directory tree; missing is fine."""
    fs, path = resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
