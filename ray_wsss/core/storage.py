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


def bucket_of(uri: str) -> str:
    """The bucket name of an ``s3://`` URI."""
    return uri[len("s3://"):].split("/", 1)[0]


def path_components(uri: str) -> tuple[str, ...]:
    """``uri`` as comparable path components: ``("s3:", bucket, *keys)``, or the local realpath's parts.

    ``a[:len(b)] == b`` then says "a is b or inside it" (``s3://b/data2`` is not inside ``s3://b/data``).
    """
    if is_s3(uri):
        return ("s3:", *[p for p in uri[len("s3://"):].split("/") if p])
    return tuple(p for p in os.path.realpath(os.path.expanduser(uri)).split(os.sep) if p)


def is_bucket_root(uri: str) -> bool:
    """``s3://bucket`` or ``s3://bucket/``: never a stage's output (other data shares the bucket)."""
    return is_s3(uri) and not uri[len("s3://"):].strip("/").partition("/")[2]


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
        return pafs.PyFileSystem(pafs.FSSpecHandler(s3_client(options))), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def s3_client(options: StorageOptions | None = None):
    """The s3fs filesystem for ``options`` (one that never creates buckets: see ray_wsss.core.s3)."""
    from ray_wsss.core.s3 import NoBucketCreationS3FileSystem

    opts = (options or StorageOptions()).resolved()
    client_kwargs: dict[str, Any] = {}
    if opts.region:
        client_kwargs["region_name"] = opts.region
    return NoBucketCreationS3FileSystem(
        key=opts.access_key,
        secret=opts.secret_key,
        endpoint_url=opts.endpoint_url,
        client_kwargs=client_kwargs,
        use_listings_cache=False,
        skip_instance_cache=True,
    )


def check_bucket(uri: str, options: StorageOptions | None = None) -> None:
    """Raise a clear error when the bucket of an ``s3://`` URI is missing or not ours to read; else nothing."""
    if not is_s3(uri):
        return
    from ray_wsss.core.s3 import MissingBucketError

    bucket = bucket_of(uri)
    try:
        s3_client(options).call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError as err:
        raise MissingBucketError(bucket, uri) from err
    except PermissionError as err:
        raise WsssError(f"bucket {bucket!r} (in {uri}) exists but these credentials may not use it: {err}") from err


def _wrap_io_error(uri: str, action: str, err: Exception, options: StorageOptions | None = None) -> WsssError:
    """The error to raise for a failed I/O call: the missing bucket when that is the cause."""
    if is_s3(uri) and isinstance(err, OSError):
        try:
            check_bucket(uri, options)
        except WsssError as bucket_err:
            return bucket_err
        except Exception:
            pass
    return WsssError(f"cannot {action} {uri}: {type(err).__name__}: {err}")


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as err:
        raise _wrap_io_error(uri, "stat", err, options) from err


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        if is_s3(uri):
            check_bucket(uri, options)
        raise WsssError(f"file not found: {uri}") from err
    except Exception as err:
        raise _wrap_io_error(uri, "read", err, options) from err


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole file atomically: a temporary name, then a rename (a single PUT on S3)."""
    fs, path = resolve(uri, options)
    try:
        if is_s3(uri):  # no directories to make on S3 (and making one could create a bucket)
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except Exception as err:
        raise _wrap_io_error(uri, "write", err, options) from err


def create_exclusive(uri: str, data: bytes, options: StorageOptions | None = None) -> bool:
    """Create ``uri`` holding ``data`` only if nothing is there; -> False when it exists already.

    Atomic, and never visible half-written: locally a complete temporary file hard-linked to the
    name (``link`` fails if the name exists, like ``O_EXCL``, which alone would expose an empty file
    to a reader until the content is written); on S3 a conditional PUT (``If-None-Match: *``, s3fs's
    ``pipe_file(mode="create")``), which AWS S3, MinIO and moto honour. A store that ignores the
    header would let two creators both succeed.
    """
    try:
        if is_s3(uri):
            try:
                s3_client(options).pipe_file(uri[len("s3://"):], data, mode="create")
            except FileExistsError:
                return False
            return True
        path = os.path.abspath(os.path.expanduser(uri))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    except WsssError:
        raise
    except Exception as err:
        raise _wrap_io_error(uri, "create", err, options) from err


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, options))


def json_bytes(obj: Any) -> bytes:
    """How the project writes JSON files."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def write_json(uri: str, obj: Any, options: StorageOptions | None = None) -> None:
    write_bytes(uri, json_bytes(obj), options)


def list_files(uri: str, options: StorageOptions | None = None, suffix: str = "") -> list[str]:
    """Files below ``uri`` (recursive), as paths relative to it, sorted. Missing dir -> []."""
    fs, path = resolve(uri, options)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except Exception as err:
        raise _wrap_io_error(uri, "list", err, options) from err
    rel = [posixpath.relpath(i.path, path) if is_s3(uri) else os.path.relpath(i.path, path)
           for i in infos if i.type == pafs.FileType.File]
    return sorted(r for r in rel if r.endswith(suffix))


def _top_level(uri: str, options: StorageOptions | None) -> list[pafs.FileInfo]:
    fs, path = resolve(uri, options)
    try:
        return fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except Exception as err:
        raise _wrap_io_error(uri, "list", err, options) from err


def list_entries(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Names of the files and folders directly in ``uri`` (not recursive), sorted. Missing dir -> []."""
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in _top_level(uri, options))


def file_sizes(uri: str, options: StorageOptions | None = None) -> dict[str, int]:
    """{name: bytes} of the files directly in ``uri``: one listing (one LIST request on S3)."""
    return {posixpath.basename(i.path): i.size for i in _top_level(uri, options) if i.type == pafs.FileType.File}


def delete(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a file or a directory tree; missing is fine. Never a whole bucket."""
    if is_bucket_root(uri):
        raise WsssError(f"refusing to delete {uri}: a bucket root is never a stage's to delete")
    fs, path = resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
