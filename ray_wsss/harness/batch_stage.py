"""What every batch stage shares: per-record error capture, streaming resumable writes, commit.

A stage maps records to rows of one table with Ray Data. Records that fail are written by the
UDF itself, straight into the stage's staged ``errors`` table, and the good rows stream on to
``write_parquet``; nothing is materialised. A rerun after a crash skips every id already staged
(as a row or as an error), so it finishes the missing work without duplicating rows.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from ray_wsss.core import schema, storage
from ray_wsss.core import commit, ownership
from ray_wsss.core.errors import RecordError, TooManyErrorsError
from ray_wsss.core.storage import StorageOptions

log = logging.getLogger(__name__)


class ErrorSink:
    """Writes failed records of one batch to the stage's staged errors table."""

    def __init__(self, out: str, stage: str, options: StorageOptions | None):
        self.out, self.stage, self.options = out, stage, options

    def write(self, failures: list[tuple[str, str]]) -> None:
        if not failures:
            return
        table = pa.table({"image_id": [f[0] for f in failures], "stage": [self.stage] * len(failures),
                          "error": [f[1] for f in failures]}, schema=schema.ERRORS)
        # Named by content: a retried task rewrites the same file instead of adding duplicates.
        digest = hashlib.sha1("\n".join(sorted(f[0] for f in failures)).encode()).hexdigest()[:16]
        commit.write_staged_table(self.out, "errors", table, self.options, name=f"errors-{digest}.parquet")
        for image_id, reason in failures:
            log.warning("[%s] %s: %s", self.stage, image_id, reason)


def map_records(records: Iterable[Any], table: str, fn: Callable[[Any], dict[str, Any]],
                record_id: Callable[[Any], str], sink: ErrorSink) -> pa.Table:
    """Apply ``fn`` per record. Failures go to ``sink`` with their reason; never a crash, never dropped."""
    rows, failures = [], []
    for record in records:
        try:
            rows.append(fn(record))
        except RecordError as err:
            failures.append((err.image_id, err.message))
        except Exception as err:  # noqa: BLE001 - one bad record must not fail the job
            failures.append((record_id(record), f"{type(err).__name__}: {err}"))
    sink.write(failures)
    return pa.Table.from_pylist(rows, schema=schema.SCHEMAS[table])


def batch_records(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A numpy-format Ray Data batch as a list of row dicts."""
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def done_ids(out: str, table: str, options: StorageOptions | None) -> set[str]:
    """Ids already staged by an earlier, crashed run: as rows or as errors."""
    return set(commit.staged_column(out, table, "image_id", options)) | set(
        commit.staged_column(out, "errors", "image_id", options))


def skip_done(ds, done: set[str]):
    """Drop the records a previous run already finished."""
    if not done:
        return ds
    done_array = pa.array(sorted(done), pa.string())
    return ds.map_batches(lambda t: t.filter(pc.invert(pc.is_in(t["image_id"], value_set=done_array))),
                          batch_format="pyarrow")


def write_rows(ds, out: str, table: str, options: StorageOptions | None) -> None:
    """Stream a Ray dataset of ``table`` rows into the stage's staging area."""
    fs, path = storage.resolve(commit.staging_uri(out, table), options)
    ds.write_parquet(path, filesystem=fs, schema=schema.SCHEMAS[table])


def begin(out: str, stage: str, overwrite: bool, options: StorageOptions | None) -> dict[str, Any] | None:
    """The skipped-stage summary if ``out`` is committed (and not overwriting); else claim it to run.

    Runs under the output's lock (``ownership.owns_output`` on the stage's ``run``). A foreign out,
    or another stage's, is refused; ``--overwrite`` deletes only what the stage's journal lists.
    """
    ownership.require_lock(out, stage)
    journal = commit.check_claimable(out, stage, options)
    if journal is not None and journal.committed and not overwrite:
        log.info("%s is already committed; skipping (pass --overwrite to redo it)", out)
        summary_uri = storage.join(out, "summary.json")
        previous = storage.read_json(summary_uri, options) if storage.exists(summary_uri, options) else {}
        return {**previous, "stage": stage, "out": out, "skipped": True}
    if overwrite:
        commit.reset_stage(out, options, stage)
    commit.claim(out, stage, options)
    return None


def commit_tables(out: str, table: str, metadata: dict[str, Any], summary: dict[str, Any], max_errors: int | None,
           options: StorageOptions | None) -> dict[str, Any]:
    """Check --max-errors, then commit ``table`` + errors with dataset.json and summary.json."""
    num_errors = len(commit.staged_column(out, "errors", "image_id", options))
    check_errors(out, num_errors, max_errors, options)
    metadata.setdefault("counts", {})["errors"] = num_errors
    final: dict[str, Any] = {}

    def make_summary(manifest: dict) -> dict:
        final.update(summary, rows=manifest["tables"][table]["rows"],
                     errors=manifest["tables"]["errors"]["rows"], skipped=False)
        return final

    commit.commit_stage(out, [table, "errors"], metadata, options, make_summary, stage=summary.get("stage"))
    return final


def check_errors(out: str, num_errors: int, max_errors: int | None, options: StorageOptions | None) -> None:
    """Fail past --max-errors, quoting the first reasons; the staged errors stay for inspection."""
    if max_errors is None or num_errors <= max_errors:
        return
    import pyarrow.parquet as pq

    reasons = []
    for uri in commit.readable_staged_files(out, "errors", options)[:3]:
        fs, path = storage.resolve(uri, options)
        t = pq.read_table(path, filesystem=fs)
        reasons += [f"{i}: {e}" for i, e in zip(t["image_id"].to_pylist(), t["error"].to_pylist())]
    raise TooManyErrorsError(
        f"{num_errors} records failed, more than --max-errors {max_errors}; first ones: {reasons[:5]}; "
        f"all failures are staged under {commit.staging_uri(out, 'errors')}")


class Timer:
    def __init__(self) -> None:
        self.start = time.time()

    def seconds(self) -> float:
        return round(time.time() - self.start, 2)


def read_committed(out: str, table: str, options: StorageOptions | None, columns: list[str] | None = None,
                   split: str | None = None):
    """A committed table as a Ray dataset (only the files its manifest names), optionally one split."""
    import ray.data

    files = commit.table_files(out, table, options)
    fs, _ = storage.resolve(out, options)
    paths = [storage.resolve(f, options)[1] for f in files]
    wanted = None if columns is None else sorted(set(columns) | ({"split"} if split else set()))
    if not paths:
        return ray.data.from_arrow(schema.SCHEMAS[table].empty_table().select(wanted or schema.SCHEMAS[table].names))
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=wanted)
    if split:
        names = [s.strip() for s in split.split(",") if s.strip()]
        value_set = pa.array(names, pa.string())
        keep = columns
        ds = ds.map_batches(lambda t: (t.filter(pc.is_in(t["split"], value_set=value_set))
                                       .select(keep or t.column_names)), batch_format="pyarrow")
    return ds
