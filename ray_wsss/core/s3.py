"""The S3 client the project uses: s3fs, except that it never creates a bucket.

s3fs's ``mkdir``/``makedirs`` create a missing bucket (in the client's region) when asked for a
directory inside it, and pyarrow, Ray Data and Ray Train all call ``create_dir`` before writing. A
typo in a bucket name then made a new bucket in one region and a cryptic error in another. S3 has
no directories, so below an existing bucket there is nothing to create; above it we refuse.
"""
from __future__ import annotations

import s3fs
from fsspec.asyn import sync_wrapper

from ray_wsss.core.errors import WsssError


class MissingBucketError(WsssError, FileNotFoundError):
    """An ``s3://`` URI names a bucket that does not exist (ray-wsss never creates buckets)."""

    def __init__(self, bucket: str, uri: str | None = None):
        where = f" (in {uri})" if uri else ""
        super().__init__(f"bucket {bucket!r} does not exist{where}: create it first, or fix the URI; "
                         "ray-wsss never creates buckets")
        self.bucket = bucket


class NoBucketCreationS3FileSystem(s3fs.S3FileSystem):
    """``S3FileSystem`` whose ``mkdir``/``makedirs`` check the bucket instead of creating it."""

    async def _mkdir(self, path, acl=False, create_parents=True, **kwargs):
        bucket, key, _ = self.split_path(self._strip_protocol(path).rstrip("/"))
        if not await self._exists(bucket):
            raise MissingBucketError(bucket, f"s3://{path}")
        if not key:
            raise FileExistsError(bucket)  # what s3fs raises for an existing bucket; makedirs(exist_ok) passes

    mkdir = sync_wrapper(_mkdir)  # s3fs binds its sync mkdir to its own _mkdir: rebind to ours
