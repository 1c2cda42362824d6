"""The batch-stage harness: one way to run prepare_data, extract_seeds, make_masks, segment and evaluate.

Every per-image table is file-granular. The sample shards are files of one split each, of at most
``rows_per_file`` rows, and every table a later stage derives from them has one file per samples file,
with the same name and the samples' row order (a subsequence: records that fail go to the errors table).
So a stage pairs its inputs file by file, in order, with no join and no shuffle; an actor holds one batch
of images plus one file's small paired columns (seed maps, masks); and a crashed stage resumes at the grain
of one file.

A stage describes itself as a :class:`BatchStage`: one :class:`FileTask` per output file, the worker class
that each actor of a Ray Data actor pool builds once (it loads its model there), and what to commit.
:func:`run` does the rest: skip a committed stage, stage every file not staged yet, check ``max_errors``
and that a non-empty input gave rows, commit atomically, draw the contact sheet.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from ray_wsss.core import commit, ownership, schema, storage
from ray_wsss.core.config import option
from ray_wsss.core.errors import RecordError, TooManyErrorsError, WsssError
from ray_wsss.core.storage import StorageOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StageConfig:
    """What every batch stage's config has; a stage's config dataclass subclasses it."""

    out: str = option("runs/default/out", "output URI (local path or s3://)")
    batch_size: int = option(8, "records per batch an actor processes at once", min=1)
    use_gpu: bool = option(False, "one GPU per actor")
    num_actors: int | None = option(None, "most actors in the pool (default: as many as the cluster's resources allow, "
                                          "growing with an autoscaling cluster)", min=1)
    max_errors: int | None = option(None, "fail when more records than this fail (default: never)", min=0)
    overwrite: bool = option(False, "redo a stage that is already committed")
    break_lock: bool = ownership.break_lock_option()
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)


@dataclasses.dataclass
class DataStageConfig(StageConfig):
    """A stage that reads the sample shards."""

    data: str = option("runs/default/data", "sample shards URI (prepare_data's --out)")
    split: str | None = option(None, "comma-separated splits to process (default: all)")

    def splits(self) -> list[str] | None:
        return parse_splits(self.split)


def parse_splits(split: str | None) -> list[str] | None:
    """"train, val" -> ["train", "val"]; None or "" -> None (all splits)."""
    names = [s.strip() for s in (split or "").split(",") if s.strip()]
    return names or None


@dataclasses.dataclass(frozen=True)
class FileTask:
    """One output file: the records that drive it and the co-partitioned files paired with them.

    ``primary`` is the URI of the Parquet file whose rows drive the task (streamed in batches), or None when
    the records come inline (prepare's listing). ``paired`` maps a role to the URI of a file of the same
    name in another table, read whole and matched to the primary rows by ``image_id``.
    """

    name: str
    primary: str | None = None
    paired: tuple[tuple[str, str], ...] = ()
    records: tuple[dict[str, Any], ...] = ()

    def fingerprint(self) -> str:
        """What the file is made from: its inputs, or its records' ids."""
        ids = [str(r.get("image_id")) for r in self.records]
        return hashlib.sha1(json.dumps([self.primary, list(self.paired), ids]).encode()).hexdigest()[:16]


class Worker(Protocol):
    """A stage's per-actor worker, built as ``worker_class(cfg, *worker_args)``.

    ``columns`` names the columns to read per role (``"primary"`` and each paired role);
    ``unclaimed_are_errors`` (optional) the paired roles whose rows must each match a primary row. ``process`` turns
    a batch of records (a primary row with each paired role's row under the role's name, or None when the
    paired file has none) into (rows of the output table, [(image_id, reason)] failures).
    """

    columns: dict[str, list[str]]

    def process(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]: ...


@dataclasses.dataclass
class BatchStage:
    """What a stage gives :func:`run`. ``table`` None: the stage writes no table (evaluate), and each
    task's result row carries what ``reduce`` folds into the summary."""

    name: str
    table: str | None
    worker: type
    worker_args: tuple
    tasks: list[FileTask]
    metadata: dict[str, Any]
    summary: dict[str, Any]
    remote_args: dict[str, Any] = dataclasses.field(default_factory=lambda: {"num_cpus": 1})
    file_splits: dict[str, str] = dataclasses.field(default_factory=dict)
    contact_sheet: Callable[[], bytes | None] | None = None
    reduce: Callable[[Iterator[dict[str, Any]]], dict[str, Any]] | None = None
    listing_errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    after_tasks: Callable[[], dict[str, Any]] | None = None  # facts known once the tasks ran: into metadata + summary


# ---------------------------------------------------------------- driver side

def run(cfg: StageConfig, name: str, build: Callable[[], BatchStage],
        inputs: Sequence[str | None] = ()) -> dict[str, Any]:
    """Run a batch stage: skipped if committed, else every unstaged file on an actor pool, then commit.

    Runs under the output's lock (``ownership.owns_output`` on the stage's ``run``); ``inputs`` (the URIs
    the stage reads) go into its journal, so an output nested in an input is reset with it.
    """
    timer = Timer()
    skipped = begin(cfg.out, name, cfg.overwrite, cfg.storage, inputs)
    if skipped:
        return skipped
    stage = build()
    late: dict[str, Any] = {}
    if stage.table is None:  # a reduction (evaluate): cheap, so rerun whole rather than resumed
        late.update(stage.reduce(map_tasks(cfg, stage, stage.tasks)))
    else:
        _check_plan(cfg, stage)
        todo = [t for t in stage.tasks if not _is_staged(cfg.out, stage.table, t.name, cfg.storage)]
        log.info("[%s] %d of %d files to make under %s", name, len(todo), len(stage.tasks), cfg.out)
        for result in map_tasks(cfg, stage, todo):
            log.info("[%s] %s: %d rows, %d errors", name, result["name"], result["rows"], result["errors"])
    if stage.listing_errors:
        write_errors(cfg.out, "listing", stage.name, stage.listing_errors, cfg.storage)
    rows, errors = _staged_counts(cfg.out, stage.table, cfg.storage)
    check_errors(cfg.out, errors, cfg.max_errors, cfg.storage)
    if stage.table is not None and rows == 0 and errors:
        raise WsssError(f"[{name}] every one of the {errors} input records failed, so nothing would be committed "
                        f"to {cfg.out}; first reasons: {first_errors(cfg.out, cfg.storage)}")
    late.update(stage.after_tasks() if stage.after_tasks else {})
    metadata = {**stage.metadata, **late}
    metadata["counts"] = {**metadata.get("counts", {}), "errors": errors}
    summary = commit_tables(cfg.out, stage.table, metadata,
                            {**stage.summary, **late, "seconds": timer.seconds()}, cfg.storage,
                            file_splits=stage.file_splits, stage=name)
    if stage.contact_sheet is not None:
        png = stage.contact_sheet()
        if png:
            commit.write_output(cfg.out, "contact_sheet.png", png, cfg.storage)
    return summary


def map_tasks(cfg: StageConfig, stage: BatchStage, tasks: Sequence[FileTask]) -> Iterator[dict[str, Any]]:
    """The tasks on a Ray Data actor pool (one task per call); yields each task's result row as it lands."""
    import ray.data

    if not tasks:
        return
    items = [{"task": task} for task in tasks]
    # The pool starts as large as it can usefully be: from one actor, Ray Data's autoscaler did not grow it on
    # a 2-CPU machine (a seeds stage's 2-4 files all queued on the first actor, 1 of 2 CPUs busy). Two tasks
    # in flight per actor, not Ray's default 4, so files spread over the actors; and not 1, which would keep
    # the pool's utilisation under Ray's scale-up threshold (175 %) and so stop an autoscaling cluster's
    # new nodes from adding actors.
    compute = ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_actors,
                                         initial_size=initial_actors(len(tasks), cfg.num_actors, stage.remote_args),
                                         max_tasks_in_flight_per_actor=2)
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _TaskRunner, fn_constructor_args=(stage.worker, stage.worker_args, cfg, stage.name, stage.table),
        batch_size=1, batch_format="numpy", compute=compute, **stage.remote_args)
    # Block by block, nothing prefetched: iter_rows() prefetches one block, so each file's result reached the
    # driver only once the next file was done (the first evaluation counts waited for the second file).
    for block in results.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        yield from block.to_pylist()


def initial_actors(num_tasks: int, most: int | None, remote_args: dict[str, Any],
                   cluster: dict[str, float] | None = None) -> int:
    """Actors to start at once: one per task, at most ``most`` and what the cluster's resources hold now
    (an autoscaling cluster grows the pool later, up to ``most``)."""
    import ray

    cluster = ray.cluster_resources() if cluster is None else cluster
    wanted = {"CPU": remote_args.get("num_cpus", 1), "GPU": remote_args.get("num_gpus", 0),
              **remote_args.get("resources", {})}
    fit = min((int(cluster.get(name, 0) // amount) for name, amount in wanted.items() if amount), default=num_tasks)
    return max(1, min(num_tasks, most or num_tasks, fit))


def _check_plan(cfg: StageConfig, stage: BatchStage) -> None:
    """Staged files of an earlier run must be files this run would make from the same inputs, or the commit
    would mix two plans; the plan (each file's fingerprint) is kept in the staging area for the next rerun."""
    staging = commit.staging_uri(cfg.out, stage.table)
    plan_uri = storage.join(cfg.out, commit.STAGING_DIR, f"{stage.table}.plan.json")
    planned = {t.name: t.fingerprint() for t in stage.tasks}
    earlier = storage.read_json(plan_uri, cfg.storage) if storage.exists(plan_uri, cfg.storage) else {}
    staged = storage.list_files(staging, cfg.storage, suffix=".parquet")
    foreign = sorted(n for n in staged if n not in planned or earlier.get(n, planned[n]) != planned[n])
    if foreign:
        raise WsssError(f"{staging} holds files an earlier, unfinished run planned differently ({foreign[:3]}"
                        f"{' ...' if len(foreign) > 3 else ''}: other inputs, splits or --rows-per-file?); "
                        "rerun with the same settings to resume it, or pass --overwrite to start over")
    storage.write_json(plan_uri, {**earlier, **planned}, cfg.storage)


def begin(out: str, stage: str, overwrite: bool, options: StorageOptions | None,
          inputs: Sequence[str | None] = ()) -> dict[str, Any] | None:
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
    commit.claim(out, stage, options, inputs=inputs)
    return None


def commit_tables(out: str, table: str | None, metadata: dict[str, Any], summary: dict[str, Any],
                  options: StorageOptions | None, file_splits: dict[str, str] | None = None,
                  stage: str | None = None) -> dict[str, Any]:
    """Commit ``table`` + errors with dataset.json and summary.json (rows and errors counted from the files)."""
    final: dict[str, Any] = {}

    def make_summary(manifest: dict) -> dict:
        if table is not None:
            final["rows"] = manifest["tables"][table]["rows"]
        final.update(summary, errors=manifest["tables"]["errors"]["rows"], skipped=False)
        return final

    tables = ["errors"] if table is None else [table, "errors"]
    commit.commit_stage(out, tables, metadata, options, make_summary, stage=stage, file_splits=file_splits)
    return final


def check_errors(out: str, num_errors: int, max_errors: int | None, options: StorageOptions | None) -> None:
    """Fail past --max-errors, quoting the first reasons; the staged errors stay for inspection."""
    if max_errors is None or num_errors <= max_errors:
        return
    raise TooManyErrorsError(
        f"{num_errors} records failed, more than --max-errors {max_errors}; first ones: "
        f"{first_errors(out, options)}; all failures are staged under {commit.staging_uri(out, 'errors')}")


def first_errors(out: str, options: StorageOptions | None, count: int = 5) -> list[str]:
    reasons: list[str] = []
    for uri in commit.readable_staged_files(out, "errors", options):
        fs, path = storage.resolve(uri, options)
        table = pq.read_table(path, filesystem=fs)
        reasons += [f"{i}: {e}" for i, e in zip(table["image_id"].to_pylist(), table["error"].to_pylist())]
        if len(reasons) >= count:
            break
    return reasons[:count]


def _staged_counts(out: str, table: str | None, options: StorageOptions | None) -> tuple[int, int]:
    def rows(name: str | None) -> int:
        if name is None:
            return 0
        total = 0
        for uri in commit.readable_staged_files(out, name, options):
            fs, path = storage.resolve(uri, options)
            total += pq.read_metadata(path, filesystem=fs).num_rows
        return total

    return rows(table), rows("errors")


def _is_staged(out: str, table: str, name: str, options: StorageOptions | None) -> bool:
    return commit.staged_file_readable(storage.join(commit.staging_uri(out, table), name), options)


# ---------------------------------------------------------------- tasks (driver)

def committed_files(out: str, table: str, options: StorageOptions | None) -> dict[str, str]:
    """{file name: URI} of a committed table, each checked complete (a truncated or missing file is named)."""
    return {posixpath.basename(uri): uri for uri in commit.table_files(out, table, options)}


def samples_files(data: str, options: StorageOptions | None, splits: Sequence[str] | None = None) -> dict[str, str]:
    """{file name: split} of the committed sample shards, restricted to ``splits``; refuses unknown splits."""
    committed_files(data, "samples", options)
    file_splits = commit.file_splits(data, "samples", options)
    if splits is None:
        return file_splits
    known = sorted(set(file_splits.values()))
    missing = [s for s in splits if s not in known]
    if missing:
        raise WsssError(f"{data} has no split(s) {missing}; it has {known}")
    return {name: split for name, split in file_splits.items() if split in splits}


def follow_samples(data: str, names: Sequence[str], options: StorageOptions | None,
                   paired: dict[str, str] | None = None) -> list[FileTask]:
    """One task per samples file: its rows drive the task; ``paired`` = {role: stage URI} whose table
    file of the same name (when committed) is paired with them."""
    tasks = []
    for name in names:
        pairs = []
        for role, (uri, table) in (paired or {}).items():
            files = committed_files(uri, table, options)
            if name in files:
                pairs.append((role, files[name]))
        tasks.append(FileTask(name=name, primary=storage.join(data, "samples", name), paired=tuple(pairs)))
    return tasks


# ---------------------------------------------------------------- tasks (actor side)

class _TaskRunner:
    """The actor: builds the stage's worker once, then makes one output file per task."""

    def __init__(self, worker_class: type, worker_args: tuple, cfg: StageConfig, stage: str, table: str | None):
        self.worker = worker_class(cfg, *worker_args)
        self.cfg, self.stage, self.table = cfg, stage, table

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        results = [self._run(task) for task in batch["task"]]
        keys = sorted({k for r in results for k in r})
        return {k: [r.get(k) for r in results] for k in keys}

    def _run(self, task: FileTask) -> dict[str, Any]:
        started_at, started = time.time(), time.process_time()
        in_worker = 0.0
        rows_out: list[pa.RecordBatch] = []
        failures: list[tuple[str, str]] = []
        target = schema.SCHEMAS[self.table] if self.table else None
        unclaimed = getattr(self.worker, "unclaimed_are_errors", ())
        for records in iter_task_records(task, self.worker.columns, self.cfg.batch_size, self.cfg.storage,
                                         failures, unclaimed):
            before = time.process_time()
            rows, failed = _process(self.worker, records)
            in_worker += time.process_time() - before
            failures += failed
            if target is not None and rows:
                rows_out.append(pa.RecordBatch.from_pylist(rows, schema=target))
        result = {"name": task.name, "rows": sum(b.num_rows for b in rows_out), "errors": len(failures)}
        if failures:
            write_errors(self.cfg.out, task.name, self.stage, failures, self.cfg.storage)
        if target is not None:
            # Written last: a readable table file says the task (and its errors) is complete.
            write_table_file(commit.staging_uri(self.cfg.out, self.table), task.name,
                             pa.Table.from_batches(rows_out, schema=target), self.cfg.storage, self.table)
        finish = getattr(self.worker, "task_result", None)
        # When the task started, and the CPU seconds of this actor process on it and inside the stage's worker:
        # what the harness itself costs per file (reading, pairing, Arrow rows, writing) is the difference.
        return {**result, **(finish() if finish else {}), "task_started_at": started_at,
                "task_cpu_seconds": time.process_time() - started, "worker_cpu_seconds": in_worker}


def _process(worker: Worker, records: list[dict[str, Any]]) -> tuple[list[dict], list[tuple[str, str]]]:
    """The worker on a batch; a batch that raises is retried record by record, so one bad record fails alone."""
    try:
        return worker.process(records)
    except Exception as err:
        if len(records) == 1:
            return [], [_failure(records[0], err)]
    rows, failures = [], []
    for record in records:
        try:
            good, bad = worker.process([record])
        except Exception as err:
            good, bad = [], [_failure(record, err)]
        rows += good
        failures += bad
    return rows, failures


def _failure(record: dict[str, Any], err: BaseException) -> tuple[str, str]:
    if isinstance(err, RecordError):
        return err.image_id, err.message
    return str(record.get("image_id")), f"{type(err).__name__}: {err}"


def iter_task_records(task: FileTask, columns: dict[str, list[str]], batch_size: int,
                      options: StorageOptions | None, failures: list[tuple[str, str]],
                      unclaimed_are_errors: Sequence[str] = ()) -> Iterator[list[dict]]:
    """Batches of a task's records: primary rows (streamed) with each paired role's row matched by id.

    Rows of the roles in ``unclaimed_are_errors`` that no primary row claims are appended to ``failures``:
    they name images the data lacks.
    """
    if task.primary is None:
        for start in range(0, len(task.records), batch_size):
            yield [dict(r) for r in task.records[start:start + batch_size]]
        return
    paired = {role: _rows_by_id(uri, columns.get(role), options) for role, uri in task.paired}
    claimed: set[str] = set()
    for batch in iter_file_batches(task.primary, columns.get("primary"), batch_size, options):
        records = batch.to_pylist()
        for record in records:
            claimed.add(record["image_id"])
            for role in columns:
                if role != "primary":
                    record[role] = paired.get(role, {}).get(record["image_id"])
        yield records
    for role in unclaimed_are_errors:
        by_id = paired.get(role, {})
        failures += [(image_id, f"a {role} row for an image that is not in this file of the data "
                                f"({task.primary}); was it made from other sample shards?")
                     for image_id in by_id if image_id not in claimed]


def iter_file_batches(uri: str, columns: list[str] | None, batch_size: int,
                      options: StorageOptions | None) -> Iterator[pa.RecordBatch]:
    """Stream one Parquet file in batches of ``batch_size`` rows (memory: one batch)."""
    fs, path = storage.resolve(uri, options)
    try:
        with fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)
    except (OSError, pa.ArrowInvalid) as err:
        raise WsssError(f"cannot read {uri}: {type(err).__name__}: {err}") from err


def _rows_by_id(uri: str, columns: list[str] | None, options: StorageOptions | None) -> dict[str, dict]:
    fs, path = storage.resolve(uri, options)
    wanted = None if columns is None else sorted(set(columns) | {"image_id"})
    try:
        table = pq.read_table(path, filesystem=fs, columns=wanted)
    except (OSError, pa.ArrowInvalid) as err:
        raise WsssError(f"cannot read {uri}: {type(err).__name__}: {err}") from err
    return {row["image_id"]: row for row in table.to_pylist()}


def write_table_file(directory: str, name: str, table: pa.Table, options: StorageOptions | None,
                     contract: str | None = None) -> str:
    """Write one Parquet file atomically: built in a local temporary file, then a rename or a single PUT.

    ``contract``: the table's name in ``schema.SCHEMAS``, whose columns may have their own codec.
    """
    uri = storage.join(directory, name)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        pq.write_table(table, local, row_group_size=max(1, table.num_rows),
                       compression=schema.compression(contract, table.column_names))
        with open(local, "rb") as f:
            storage.write_bytes(uri, f.read(), options)
    return uri


def write_errors(out: str, name: str, stage: str, failures: list[tuple[str, str]],
                 options: StorageOptions | None) -> None:
    """Stage ``failures`` as ``errors/<name>``: one file per task, so a retried task rewrites it, never adds."""
    table = pa.table({"image_id": [f[0] for f in failures], "stage": [stage] * len(failures),
                      "error": [f[1] for f in failures]}, schema=schema.ERRORS)
    base = name if name.endswith(".parquet") else f"{name}.parquet"
    write_table_file(commit.staging_uri(out, "errors"), base, table, options)
    for image_id, reason in failures[:20]:
        log.warning("[%s] %s: %s", stage, image_id, reason)


class Timer:
    def __init__(self) -> None:
        self.start = time.time()

    def seconds(self) -> float:
        return round(time.time() - self.start, 2)


def contact_sheet(out: str, table: str, data: str, panels: Callable[[dict, dict], list], titles: Sequence[str],
                  options: StorageOptions | None, count: int = 6) -> bytes | None:
    """A PNG of the first ``count`` rows of a committed table: ``panels(row, sample)`` gives one row of pictures
    (``sample`` holds the image and its ground truth)."""
    from ray_wsss.core import viz

    rows = commit.read_first_rows(out, table, count, options)
    if not rows:
        return None
    samples = commit.read_rows_by_id(data, "samples", [r["image_id"] for r in rows], options,
                                     columns=["image_id", "image", "gt_mask"])
    return viz.contact_sheet([panels(row, samples[row["image_id"]]) for row in rows if row["image_id"] in samples],
                             titles)
