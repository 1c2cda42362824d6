"""The stage commit protocol: staged tables, the ``_SUCCESS`` manifest, the stage's journal, resets.

Every stage writes its tables under ``<out>/_staging/`` and becomes visible only when
:func:`commit_stage` moves them into place and writes ``<out>/_SUCCESS``, a manifest naming every data
file. Readers go through the manifest, so a crashed job never leaves a stage that looks finished, and
stray files are never read.

Ownership: a stage deletes only what it provably wrote.

- ``<out>`` is a stage's when it holds ``_SUCCESS`` (committed) or ``_staging/`` (started). A stage
  claims an out (:func:`claim`) before it writes anything else there, which writes its *journal*
  ``_staging/_OWNER.json``; an out that is not empty and holds neither is foreign and is refused,
  ``--overwrite`` or not, as is an out holding another stage's output.
- The journal lists every file the stage wrote outside ``_staging/`` (tables, ``dataset.json``,
  ``summary.json``, ``config.yaml``, contact sheets, metrics) and the folders it handed whole to a
  library that names its own files (Ray Train's run folder ``<out>/<name>/``). A file is journaled
  before it is written (:func:`record`, :func:`write_output`), and journaling refuses a path that
  exists but is not in the journal, so a stage never replaces a file it did not write. At commit the
  journal moves into the manifest (``files``, ``dirs``), which stays the journal of a committed out.
- ``--overwrite`` (:func:`reset_stage`) deletes exactly the journaled files and folders, then
  ``_SUCCESS`` and ``_staging/``. Any other file in the out (a user's ``notes.txt``, an output of an
  older version that kept no journal) makes it refuse, naming the files, before deleting anything.
- Nested stage outputs: an evaluation writes ``<pred>/eval/`` by default, a stage output of its own
  (with its own journal) inside the stage it scores. A nested output whose journal lists the out
  among its inputs is derived from it, and is reset with it, by its own journal: its figures
  describe data that is being replaced (make_masks reads its threshold from
  ``<seeds>/eval/summary.json``). Any other nested stage output, a locked one, or one holding
  unknown files makes the reset refuse.

Every step keeps a marker in place (the journal is written before ``_SUCCESS`` goes, ``_staging/``
goes last), so a crash at any point leaves an out that is still recognisably the stage's.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ray_wsss.core.errors import OwnershipError, StageNotCommittedError, WsssError
from ray_wsss.core.storage import (
    StorageOptions,
    check_bucket,
    delete,
    exists,
    file_sizes,
    is_s3,
    join,
    list_entries,
    list_files,
    path_components,
    read_json,
    resolve,
    write_bytes,
    write_json,
)

SUCCESS_FILE = "_SUCCESS"
STAGING_DIR = "_staging"
MANIFEST_VERSION = 2  # 2: per-table "file_splits" (every per-image file holds one split)
JOURNAL_FILE = "_OWNER.json"  # under _staging/
LOCK_FILE = "_LOCK"           # see ray_wsss.core.ownership
SHOWN = 10                    # file names quoted in a refusal


def staging_uri(out: str, table: str) -> str:
    """Where a stage writes ``table`` before commit."""
    return join(out, STAGING_DIR, table)


def is_committed(out: str, options: StorageOptions | None = None) -> bool:
    return exists(join(out, SUCCESS_FILE), options)


def _read_json_or_none(uri: str, options: StorageOptions | None) -> dict | None:
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def read_manifest(out: str, options: StorageOptions | None = None) -> dict:
    manifest = _read_json_or_none(join(out, SUCCESS_FILE), options)
    if manifest is None:
        check_bucket(out, options)
        raise StageNotCommittedError(
            f"{out} holds no committed stage output ({SUCCESS_FILE} missing): "
            "the job that writes it has not finished, crashed, or the URI is wrong"
        )
    return manifest


# ---------------------------------------------------------------- ownership: the journal

@dataclasses.dataclass
class Journal:
    """What a stage wrote in its out: from the manifest (committed) and ``_staging/_OWNER.json``."""

    stage: str | None
    files: set[str]
    dirs: set[str]
    committed: bool
    inputs: set[str] = dataclasses.field(default_factory=set)  # URIs the stage reads (if it said so)
    manifest: dict = dataclasses.field(default_factory=dict)  # the committed manifest, as read
    entries: list[str] = dataclasses.field(default_factory=list)  # names at the out's top level


def _journal_uri(out: str) -> str:
    return join(out, STAGING_DIR, JOURNAL_FILE)


def read_journal(out: str, options: StorageOptions | None = None) -> Journal | None:
    """The out's journal; None when the out is not a stage's (no ``_SUCCESS``, no ``_staging/``)."""
    return _journal_from(out, list_entries(out, options), options)


def _journal_from(out: str, entries: list[str], options: StorageOptions | None) -> Journal | None:
    """The journal, given the names at the out's top level (one listing tells both markers apart)."""
    committed = SUCCESS_FILE in entries
    if not committed and STAGING_DIR not in entries:
        return None
    manifest = read_json(join(out, SUCCESS_FILE), options) if committed else {}
    owner = _read_json_or_none(_journal_uri(out), options) or {}
    tables = {f"{t}/{name}" for t, entry in manifest.get("tables", {}).items() for name in entry["files"]}
    files = set(manifest.get("files", [])) | set(owner.get("files", [])) | tables
    dirs = set(manifest.get("dirs", [])) | set(owner.get("dirs", []))
    for rel in files | dirs:
        _check_relative(out, rel)
    inputs = set(manifest.get("inputs", [])) | set(owner.get("inputs", []))
    return Journal(manifest.get("stage") or owner.get("stage"), files, dirs, committed, inputs, manifest, entries)


def _check_relative(out: str, rel: str) -> None:
    """A journal entry must name something inside the out (a tampered journal must not delete elsewhere)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == STAGING_DIR:
        raise OwnershipError(f"the journal of {out} lists {rel!r}, which is not a path inside it; "
                             "refusing to trust it (was the manifest edited?)")


def check_claimable(out: str, stage: str | None, options: StorageOptions | None = None) -> Journal | None:
    """Refuse an out that holds foreign files or another stage's output; -> its journal (None if empty)."""
    entries = list_entries(out, options)
    journal = _journal_from(out, entries, options)
    if journal is None:
        foreign = [name for name in entries if not _is_lock(name)]
        if foreign:
            raise OwnershipError(
                f"{out} is not empty and holds no stage output (neither {SUCCESS_FILE} nor {STAGING_DIR}/): "
                f"{_quote(foreign)}. A stage writes only into an empty --out or its own earlier output, "
                "--overwrite or not; choose another --out")
        return None
    if stage and journal.stage and journal.stage != stage:
        raise OwnershipError(f"{out} holds the output of stage {journal.stage!r}, not {stage!r}; choose another --out")
    return journal


def claim(out: str, stage: str | None, options: StorageOptions | None = None, dirs: Iterable[str] = (),
          inputs: Iterable[str | None] = ()) -> None:
    """Make ``out`` this stage's before anything else is written there (resuming its own earlier work is fine).

    ``inputs``: URIs the stage reads, kept in the journal; a stage output nested inside one of them
    is reset with it (see the module docstring).
    """
    check_claimable(out, stage, options)
    record(out, (), options, dirs=dirs, stage=stage, inputs=inputs)


def record(out: str, files: Iterable[str], options: StorageOptions | None = None, dirs: Iterable[str] = (),
           stage: str | None = None, inputs: Iterable[str | None] = ()) -> Journal:
    """Journal files (paths relative to ``out``) and whole folders the stage is about to write.

    Refuses a path that exists but is not journaled already: it is not the stage's to replace.
    Written into the manifest when the out is committed, else into ``_staging/_OWNER.json``.
    """
    entries = list_entries(out, options)
    journal = _journal_from(out, entries, options) or Journal(stage, set(), set(), committed=False, entries=entries)
    new_files, new_dirs = set(files) - journal.files, set(dirs) - journal.dirs
    for rel in sorted(new_files | new_dirs):
        _check_relative(out, rel)
    taken = _existing(out, new_files | new_dirs, journal.entries, options)
    if taken:
        raise OwnershipError(f"{out}: {_quote(taken)} exist(s) but this stage did not write them (they are not in "
                             "its journal); refusing to replace them. Move them away or choose another --out")
    new_inputs = {uri for uri in inputs if uri} - journal.inputs
    journal.files |= new_files
    journal.dirs |= new_dirs
    journal.inputs |= new_inputs
    journal.stage = journal.stage or stage
    changed = bool(new_files or new_dirs or new_inputs)
    if journal.committed:
        if changed:
            write_json(join(out, SUCCESS_FILE), {**journal.manifest, **_journal_fields(journal)}, options)
    elif changed or _read_json_or_none(_journal_uri(out), options) is None:
        write_json(_journal_uri(out), _journal_fields(journal), options)
    return journal


def _existing(out: str, paths: set[str], top_level: list[str], options: StorageOptions | None) -> list[str]:
    """Which of ``paths`` (relative to ``out``) exist: one listing per folder, not one request per path."""
    by_folder: dict[str, set[str]] = {}
    for rel in paths:
        by_folder.setdefault(posixpath.dirname(rel), set()).add(posixpath.basename(rel))
    found = []
    for folder, names in sorted(by_folder.items()):
        present = set(list_entries(join(out, folder), options) if folder else top_level)
        found += [posixpath.join(folder, n) for n in sorted(names & present)]
    return found


def _journal_fields(journal: Journal) -> dict:
    return {"stage": journal.stage, "files": sorted(journal.files), "dirs": sorted(journal.dirs),
            "inputs": sorted(journal.inputs)}


def write_output(out: str, name: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a side file (``contact_sheet.png``, ``config.yaml``...) the stage owns: journal it, then write it."""
    record(out, [name], options)
    write_bytes(join(out, name), data, options)


def reset_stage(out: str, options: StorageOptions | None = None, stage: str | None = None) -> None:
    """``--overwrite``: delete what the stage's journal lists (see the module docstring), nothing else."""
    journal = check_claimable(out, stage, options)
    if journal is None:
        return
    nested = _plan_reset(out, journal, options)
    _reset(out, journal, nested, options)


def _plan_reset(out: str, journal: Journal, options: StorageOptions | None) -> dict[str, tuple[Journal, dict]]:
    """Check that everything in ``out`` is journaled, here or in a nested stage output; -> the nested plans."""
    present = [rel for rel in list_files(out, options)
               if not _covered(rel, {STAGING_DIR} | journal.dirs) and rel != SUCCESS_FILE and not _is_lock(rel)]
    locked = [rel for rel in present if _is_lock(posixpath.basename(rel))]
    if locked:
        raise OwnershipError(f"--overwrite refused: a job is writing inside {out} ({_quote(locked)}); "
                             "wait for it to finish")
    nested_roots = sorted({root for root in map(_nested_root, present) if root})
    nested_roots = [r for r in nested_roots if not any(_covered(r, {o}) for o in nested_roots if o != r)]
    nested: dict[str, tuple[Journal, dict]] = {}
    for root in nested_roots:
        child = join(out, root)
        child_journal = read_journal(child, options)
        if path_components(out) not in {path_components(uri) for uri in child_journal.inputs}:
            raise OwnershipError(
                f"--overwrite refused: {child} holds the output of stage {child_journal.stage or 'unknown'!r}, which "
                f"does not read {out} (its inputs: {sorted(child_journal.inputs) or 'not recorded'}); it is not "
                f"this stage's to delete. Move it out of {out} and rerun")
        nested[root] = (child_journal, _plan_reset(child, child_journal, options))
    unknown = [rel for rel in present if rel not in journal.files and not _covered(rel, set(nested_roots))]
    if unknown:
        raise OwnershipError(
            f"--overwrite refused: {out} holds files its stage did not write (not in its journal): {_quote(unknown)}. "
            "A reset deletes only what the stage wrote; move these out of it (or delete them yourself) and rerun")
    return nested


def _is_lock(name: str) -> bool:
    """The lock, or a competing run's temporary file on its way to becoming it (storage.create_exclusive)."""
    return name == LOCK_FILE or name.startswith(LOCK_FILE + ".tmp-")


def _nested_root(rel: str) -> str | None:
    """The folder of a nested stage output that ``rel`` proves (its _SUCCESS or _staging/), if any."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        if parts[i] == STAGING_DIR or (parts[i] == SUCCESS_FILE and i == len(parts) - 1):
            return "/".join(parts[:i])
    return None


def _covered(rel: str, folders: set[str]) -> bool:
    return any(rel == d or rel.startswith(d + "/") for d in folders)


def _reset(out: str, journal: Journal, nested: dict[str, tuple[Journal, dict]], options: StorageOptions | None) -> None:
    # The journal first, so that the out stays recognisably the stage's once _SUCCESS is gone.
    write_json(_journal_uri(out), _journal_fields(journal), options)
    delete(join(out, SUCCESS_FILE), options)
    for root, (child_journal, child_nested) in nested.items():
        _reset(join(out, root), child_journal, child_nested, options)
    for rel in sorted(journal.files):
        _delete_file(join(out, rel), options)
    for rel in sorted(journal.dirs):
        delete(join(out, rel), options)
    _remove_empty_dirs(out, {posixpath.dirname(r) for r in journal.files | journal.dirs}
                       | set(nested) | set(journal.manifest.get("tables", {})))
    delete(join(out, STAGING_DIR), options)


def _delete_file(uri: str, options: StorageOptions | None) -> None:
    """Delete ``uri`` if it is a file (a journaled name that became a folder is left alone)."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri, options)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def _remove_empty_dirs(out: str, folders: set[str]) -> None:
    """Local only (S3 has no folders): the table folders a reset emptied, deepest first."""
    if is_s3(out):
        return
    for rel in sorted((f for f in folders if f), key=lambda f: -f.count("/")):
        try:
            os.rmdir(os.path.join(os.path.abspath(os.path.expanduser(out)), rel))
        except OSError:
            pass  # not empty (a file we did not write) or gone


def _quote(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


# ---------------------------------------------------------------- committed tables

def _table_entry(out: str, table: str, options: StorageOptions | None) -> tuple[dict, dict]:
    """(the manifest, its entry for ``table``); refuses a missing table or a manifest of an older version."""
    manifest = read_manifest(out, options)
    if table not in manifest["tables"]:
        raise StageNotCommittedError(f"{out} has no table {table!r}; it has {sorted(manifest['tables'])}")
    if manifest.get("version", 1) < MANIFEST_VERSION:
        raise StageNotCommittedError(
            f"{out} was committed by an older ray-wsss (manifest version {manifest.get('version', 1)}, this one "
            f"reads {MANIFEST_VERSION}: per-file splits); rerun the stage that wrote it with --overwrite")
    return manifest, manifest["tables"][table]


def table_file_names(out: str, table: str, options: StorageOptions | None = None) -> list[str]:
    """Names of the committed data files of ``table`` in stage ``out`` (sorted; not opened)."""
    return list(_table_entry(out, table, options)[1]["files"])


def file_splits(out: str, table: str, options: StorageOptions | None = None) -> dict[str, str]:
    """{file name: split} of a committed per-image table: every file holds rows of one split."""
    entry = _table_entry(out, table, options)[1]
    return {name: entry["file_splits"][name] for name in entry["files"]}


def table_files(out: str, table: str, options: StorageOptions | None = None) -> list[str]:
    """URIs of the committed data files of ``table`` in stage ``out``, checked to be complete.

    One listing of the table's folder compares each file's size with the manifest's (one LIST
    request on S3); a manifest without sizes gets a footer read per file instead.
    """
    manifest, entry = _table_entry(out, table, options)
    present = file_sizes(join(out, table), options) if entry["files"] else {}
    recorded = entry.get("sizes", {})
    for name in entry["files"]:
        uri = join(out, table, name)
        if name not in present:
            raise _damaged(out, table, uri, "is missing", manifest, options)
        if name in recorded and present[name] != recorded[name]:
            raise _damaged(out, table, uri, f"has {present[name]} bytes where {recorded[name]} were committed "
                                            "(truncated or replaced)", manifest, options)
        if name not in recorded:
            _read_parquet(out, table, uri, options, manifest, metadata_only=True)
    return [join(out, table, name) for name in entry["files"]]


def _damaged(out: str, table: str, uri: str, problem: str, manifest: dict | None,
             options: StorageOptions | None) -> WsssError:
    stage = (manifest or {}).get("stage")
    if not stage and exists(join(out, "dataset.json"), options):
        stage = read_json(join(out, "dataset.json"), options).get("job")
    return WsssError(f"{uri} {problem}: it is a data file of table {table!r} in the committed output of stage "
                     f"{stage or 'unknown'!r} at {out}; rerun that stage with --overwrite to rebuild it")


def _read_parquet(out: str, table: str, uri: str, options: StorageOptions | None, manifest: dict | None = None,
                  columns: list[str] | None = None, metadata_only: bool = False):
    """Read one committed file (or its footer); a damaged file is an error naming it and its stage."""
    fs, path = resolve(uri, options)
    try:
        if metadata_only:
            return pq.read_metadata(path, filesystem=fs)
        return pq.read_table(path, filesystem=fs, columns=columns)
    except Exception as err:
        raise _damaged(out, table, uri, f"cannot be read as Parquet ({type(err).__name__}: {err})",
                       manifest, options) from err


def read_table(out: str, table: str, options: StorageOptions | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """Read a committed table into memory (small tables, tests, summaries)."""
    files = table_files(out, table, options)
    parts = [_read_parquet(out, table, f, options, columns=columns) for f in files]
    if not parts:
        from ray_wsss.core import schema

        empty = schema.SCHEMAS[table].empty_table()
        return empty if columns is None else empty.select(columns)
    return pa.concat_tables(parts, promote_options="default")


def read_first_rows(out: str, table: str, count: int, options: StorageOptions | None = None) -> list[dict]:
    """The first ``count`` rows of a committed table, reading no more files than needed."""
    rows: list[dict] = []
    for uri in table_files(out, table, options):
        if len(rows) >= count:
            break
        rows += _read_parquet(out, table, uri, options).slice(0, count - len(rows)).to_pylist()
    return rows


def read_rows_by_id(out: str, table: str, ids: list[str], options: StorageOptions | None = None,
                    columns: list[str] | None = None) -> dict[str, dict]:
    """Rows of a committed table by ``image_id`` (a few, for pictures); scans ids first, file by file."""
    import pyarrow.compute as pc

    wanted, found = set(ids), {}
    for uri in table_files(out, table, options):
        if len(found) == len(wanted):
            break
        file_ids = _read_parquet(out, table, uri, options, columns=["image_id"])["image_id"]
        mask = pc.is_in(file_ids, value_set=pa.array(sorted(wanted - set(found)), pa.string()))
        if pc.any(mask).as_py():
            for row in _read_parquet(out, table, uri, options, columns=columns).filter(mask).to_pylist():
                found[row["image_id"]] = row
    return found


# ---------------------------------------------------------------- staging and commit

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


def commit_stage(out: str, tables: Iterable[str], metadata: dict,
                 options: StorageOptions | None = None,
                 make_summary: Callable[[dict], dict] | None = None, stage: str | None = None,
                 file_splits: dict[str, str] | None = None) -> dict:
    """Move staged tables into place, write ``dataset.json`` (and ``summary.json``), then ``_SUCCESS``.

    ``make_summary(manifest)`` builds the summary from the committed row counts. Returns the
    manifest. Until the manifest exists the stage does not count as written, so a crash anywhere
    here leaves a stage that a rerun redoes. Every file is journaled before it is moved or written.
    """
    fs, _ = resolve(out, options)
    staged = {table: readable_staged_files(out, table, options) for table in tables}
    final = {table: [f"{table}/{posixpath.basename(src)}" for src in srcs] for table, srcs in staged.items()}
    side = ["dataset.json"] + (["summary.json"] if make_summary is not None else [])
    journal = record(out, [rel for rels in final.values() for rel in rels] + side, options, stage=stage)
    manifest: dict = {"version": MANIFEST_VERSION, "tables": {},
                      "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for table, srcs in staged.items():
        # Files an earlier, crashed commit moved here are journaled but no longer staged: their rows were redone.
        for rel in sorted(f for f in journal.files if f.startswith(table + "/") and f not in final[table]):
            _delete_file(join(out, rel), options)
            journal.files.discard(rel)
        if srcs and not is_s3(out):  # no empty folder for a table without files: it would outlive a reset
            fs.create_dir(resolve(join(out, table), options)[1], recursive=True)
        for src, rel in zip(srcs, final[table]):
            fs.move(resolve(src, options)[1], resolve(join(out, rel), options)[1])
        names = [posixpath.basename(rel) for rel in final[table]]
        sizes = file_sizes(join(out, table), options) if names else {}
        rows = sum(pq.read_metadata(resolve(join(out, table, n), options)[1], filesystem=fs).num_rows for n in names)
        manifest["tables"][table] = {"files": sorted(names), "rows": rows, "sizes": {n: sizes[n] for n in names},
                                     "file_splits": {n: (file_splits or {}).get(n) for n in sorted(names)}}
    write_json(join(out, "dataset.json"), metadata, options)
    if make_summary is not None:
        write_json(join(out, "summary.json"), make_summary(manifest), options)
    return _finish_commit(out, journal, manifest, options)


def commit_outputs(out: str, stage: str, fields: dict, options: StorageOptions | None = None) -> dict:
    """Commit a stage without tables (training, evaluation): its journaled files were written already.

    ``fields`` go into the manifest (e.g. ``{"checkpoint": uri}``). Returns the manifest.
    """
    journal = record(out, (), options, stage=stage)
    return _finish_commit(out, journal, {**fields, "tables": {}}, options)


def _finish_commit(out: str, journal: Journal, manifest: dict, options: StorageOptions | None) -> dict:
    """Write ``_SUCCESS`` (with the journal), then drop ``_staging/``: a marker is in place at every moment."""
    manifest = {"version": MANIFEST_VERSION, **manifest, **_journal_fields(journal),
                "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(join(out, SUCCESS_FILE), manifest, options)
    delete(join(out, STAGING_DIR), options)
    return manifest
