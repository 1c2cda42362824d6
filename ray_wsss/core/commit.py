"""The stage commit protocol: staged tables, the ``_SUCCESS`` manifest, and reading committed tables.

Every stage writes its tables under ``<out>/_staging/`` and becomes visible only when
:func:`commit_stage` moves them into place and writes ``<out>/_SUCCESS``, a manifest naming every data
file. Readers go through the manifest, so a crashed job never leaves a stage that looks finished, and
stray files are never read.
"""
from __future__ import annotations

import io
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ray_wsss.core.errors import StageNotCommittedError
from ray_wsss.core.storage import (
    StorageOptions,
    delete,
    exists,
    join,
    list_files,
    read_json,
    resolve,
    write_bytes,
    write_json,
)

SUCCESS_FILE = "_SUCCESS"
STAGING_DIR = "_staging"
MANIFEST_VERSION = 2  # 2: per-table "file_splits" (every per-image file holds one split)


def staging_uri(out: str, table: str) -> str:
    """Where a stage writes ``table`` before commit."""
    return join(out, STAGING_DIR, table)


def is_committed(out: str, options: StorageOptions | None = None) -> bool:
    return exists(join(out, SUCCESS_FILE), options)


def read_manifest(out: str, options: StorageOptions | None = None) -> dict:
    if not is_committed(out, options):
        raise StageNotCommittedError(
            f"{out} holds no committed stage output ({SUCCESS_FILE} missing): "
            "the job that writes it has not finished, crashed, or the URI is wrong"
        )
    return read_json(join(out, SUCCESS_FILE), options)


def _table_entry(out: str, table: str, options: StorageOptions | None) -> dict:
    manifest = read_manifest(out, options)
    if table not in manifest["tables"]:
        raise StageNotCommittedError(f"{out} has no table {table!r}; it has {sorted(manifest['tables'])}")
    if manifest.get("version", 1) < MANIFEST_VERSION:
        raise StageNotCommittedError(
            f"{out} was committed by an older ray-wsss (manifest version {manifest.get('version', 1)}, this one "
            f"reads {MANIFEST_VERSION}: per-file splits); rerun the stage that wrote it with --overwrite")
    return manifest["tables"][table]


def table_file_names(out: str, table: str, options: StorageOptions | None = None) -> list[str]:
    """Names of the committed data files of ``table`` in stage ``out`` (sorted)."""
    return list(_table_entry(out, table, options)["files"])


def table_files(out: str, table: str, options: StorageOptions | None = None) -> list[str]:
    """URIs of the committed data files of ``table`` in stage ``out``."""
    return [join(out, table, name) for name in table_file_names(out, table, options)]


def file_splits(out: str, table: str, options: StorageOptions | None = None) -> dict[str, str]:
    """{file name: split} of a committed per-image table: every file holds rows of one split."""
    entry = _table_entry(out, table, options)
    return {name: entry["file_splits"][name] for name in entry["files"]}


def read_table(out: str, table: str, options: StorageOptions | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """Read a committed table into memory (small tables, tests, summaries)."""
    fs, _ = resolve(out, options)
    files = table_files(out, table, options)
    parts = [pq.read_table(resolve(f, options)[1], filesystem=fs, columns=columns) for f in files]
    if not parts:
        from ray_wsss.core import schema

        return schema.SCHEMAS[table].empty_table() if columns is None else schema.SCHEMAS[table].empty_table().select(columns)
    return pa.concat_tables(parts, promote_options="default")


def read_first_rows(out: str, table: str, count: int, options: StorageOptions | None = None) -> list[dict]:
    """The first ``count`` rows of a committed table, reading no more files than needed."""
    fs, _ = resolve(out, options)
    rows: list[dict] = []
    for uri in table_files(out, table, options):
        if len(rows) >= count:
            break
        rows += pq.read_table(resolve(uri, options)[1], filesystem=fs).slice(0, count - len(rows)).to_pylist()
    return rows


def read_rows_by_id(out: str, table: str, ids: list[str], options: StorageOptions | None = None,
                    columns: list[str] | None = None) -> dict[str, dict]:
    """Rows of a committed table by ``image_id`` (a few, for pictures); scans ids first, file by file."""
    import pyarrow.compute as pc

    fs, _ = resolve(out, options)
    wanted, found = set(ids), {}
    for uri in table_files(out, table, options):
        if len(found) == len(wanted):
            break
        path = resolve(uri, options)[1]
        file_ids = pq.read_table(path, filesystem=fs, columns=["image_id"])["image_id"]
        mask = pc.is_in(file_ids, value_set=pa.array(sorted(wanted - set(found)), pa.string()))
        if pc.any(mask).as_py():
            for row in pq.read_table(path, filesystem=fs, columns=columns).filter(mask).to_pylist():
                found[row["image_id"]] = row
    return found


def write_staged_table(out: str, table: str, data: pa.Table, options: StorageOptions | None = None,
                       name: str | None = None) -> str:
    """Write one Parquet file into the staging area of ``table`` (atomic per file)."""
    buf = io.BytesIO()
    pq.write_table(data, buf)
    uri = join(staging_uri(out, table), name or f"part-{uuid.uuid4().hex[:12]}.parquet")
    write_bytes(uri, buf.getvalue(), options)
    return uri


def readable_staged_files(out: str, table: str, options: StorageOptions | None = None) -> list[str]:
    """Staged Parquet files of ``table`` whose footer reads; truncated leftovers of a crash are deleted.

    A Parquet file's footer is written last, so a file that opens holds complete rows only.
    """
    fs, _ = resolve(out, options)
    good = []
    for rel in list_files(staging_uri(out, table), options, suffix=".parquet"):
        uri = join(staging_uri(out, table), rel)
        try:
            pq.read_metadata(resolve(uri, options)[1], filesystem=fs)
            good.append(uri)
        except Exception:
            delete(uri, options)
    return good


def staged_file_readable(uri: str, options: StorageOptions | None = None) -> bool:
    """True when the staged file exists and its Parquet footer reads (it was written completely)."""
    fs, path = resolve(uri, options)
    try:
        pq.read_metadata(path, filesystem=fs)
        return True
    except Exception:
        return False


def staged_column(out: str, table: str, column: str, options: StorageOptions | None = None) -> list:
    """Values of one column over the readable staged files (resume: which ids are done)."""
    fs, _ = resolve(out, options)
    values: list = []
    for uri in readable_staged_files(out, table, options):
        values.extend(pq.read_table(resolve(uri, options)[1], filesystem=fs, columns=[column])
                      .column(column).to_pylist())
    return values


def reset_stage(out: str, options: StorageOptions | None = None) -> None:
    """Forget a stage's output entirely (``--overwrite``). The manifest goes first."""
    delete(join(out, SUCCESS_FILE), options)
    delete(out, options)


def commit_stage(out: str, tables: Iterable[str], metadata: dict,
                 options: StorageOptions | None = None,
                 make_summary: Callable[[dict], dict] | None = None,
                 file_splits: dict[str, str] | None = None) -> dict:
    """Move staged tables into place, write ``dataset.json`` (and ``summary.json``), then ``_SUCCESS``.

    ``make_summary(manifest)`` builds the summary from the committed row counts. Returns the
    manifest. Until the manifest exists the stage does not count as written, so a crash anywhere
    here leaves a stage that a rerun redoes.
    """
    fs, _ = resolve(out, options)
    manifest: dict = {"version": MANIFEST_VERSION, "tables": {},
                      "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for table in tables:
        final_dir = join(out, table)
        delete(final_dir, options)  # leftovers of an earlier crashed commit; never committed
        names = []
        for src in readable_staged_files(out, table, options):
            name = posixpath.basename(src)
            fs.create_dir(resolve(final_dir, options)[1], recursive=True)
            fs.move(resolve(src, options)[1], resolve(join(final_dir, name), options)[1])
            names.append(name)
        rows = sum(pq.read_metadata(resolve(join(final_dir, n), options)[1], filesystem=fs).num_rows
                   for n in names)
        manifest["tables"][table] = {"files": sorted(names), "rows": rows,
                                     "file_splits": {n: (file_splits or {}).get(n) for n in sorted(names)}}
    write_json(join(out, "dataset.json"), metadata, options)
    delete(join(out, STAGING_DIR), options)
    if make_summary is not None:
        write_json(join(out, "summary.json"), make_summary(manifest), options)
    write_json(join(out, SUCCESS_FILE), manifest, options)
    return manifest
