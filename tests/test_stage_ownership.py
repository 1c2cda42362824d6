"""Stage runs own their --out: foreign outs and inputs refused, --overwrite within the journal, one run at a time."""
import json
import socket
import subprocess
import sys
import threading

import pytest

from ray_wsss.core import commit, storage
from ray_wsss.core.errors import OutputLockedError, OwnershipError
from ray_wsss.stages.make_masks import MakeMasksConfig
from ray_wsss.stages.make_masks import run as make_masks
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare

TINY = dict(num_train=10, num_val=4, batch_size=4)
IDS = sorted([f"train_{i:06d}" for i in range(10)] + [f"val_{i:06d}" for i in range(4)])


def _snapshot(uri):
    return {rel: storage.read_bytes(storage.join(uri, rel)) for rel in storage.list_files(uri)}


def _ids(out):
    return sorted(commit.read_table(out, "samples").column("image_id").to_pylist())


# ---------------------------------------------------------------- refused before any work (no Ray needed)

@pytest.mark.parametrize("overwrite", [True, False])
def test_foreign_out_is_refused_and_untouched(tmp_path, overwrite):
    out = tmp_path / "home"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    before = _snapshot(str(out))
    with pytest.raises(OwnershipError, match=r"holds no stage output.*notes.txt.*photos"):
        prepare(PrepareConfig(out=str(out), overwrite=overwrite, **TINY))
    assert _snapshot(str(out)) == before


def test_bucket_root_out_is_refused_and_untouched(s3_bucket):
    storage.write_bytes(s3_bucket + "/other-team/report.csv", b"a,b\n1,2\n")
    storage.write_bytes(s3_bucket + "/top.txt", b"unrelated")
    before = _snapshot(s3_bucket)
    for out in (s3_bucket, s3_bucket + "/"):
        with pytest.raises(OwnershipError, match="bucket root"):
            prepare(PrepareConfig(out=out, overwrite=True, **TINY))
    assert _snapshot(s3_bucket) == before


@pytest.mark.parametrize("out", ["{data}", "{data}/masks", "{data}/../data"])
def test_out_equal_to_or_inside_data_is_refused(tmp_path, out):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text("{}")
    before = _snapshot(str(data))
    with pytest.raises(OwnershipError, match="the stage's input"):
        make_masks(MakeMasksConfig(seeds=str(tmp_path / "seeds"), data=str(data), out=out.format(data=data),
                                   overwrite=True))
    assert _snapshot(str(data)) == before


# ---------------------------------------------------------------- on Ray

@pytest.mark.usefixtures("ray_local")
def test_two_runs_on_one_out_one_is_refused_and_rows_are_exact(tmp_path):
    out = str(tmp_path / "data")
    barrier, outcomes = threading.Barrier(2), {}

    def run(name):
        barrier.wait()
        try:
            outcomes[name] = prepare(PrepareConfig(out=out, **TINY))
        except Exception as err:
            outcomes[name] = err

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [o for o in outcomes.values() if isinstance(o, OutputLockedError)]
    done = [o for o in outcomes.values() if isinstance(o, dict)]
    assert len(refused) == 1 and len(done) == 1, outcomes
    assert "locked by another run" in str(refused[0]) and f"pid {__import__('os').getpid()}" in str(refused[0])
    assert _ids(out) == IDS and done[0]["rows"] == len(IDS)         # every id once
    assert not storage.exists(storage.join(out, commit.LOCK_FILE))  # released after the run


@pytest.mark.usefixtures("ray_local")
def test_overwrite_redoes_only_the_stages_files(tmp_path):
    out = str(tmp_path / "data")
    prepare(PrepareConfig(out=out, **TINY))
    notes = tmp_path / "data" / "notes.txt"
    notes.write_text("the user's")
    with pytest.raises(OwnershipError, match=r"--overwrite refused.*notes.txt"):
        prepare(PrepareConfig(out=out, overwrite=True, **TINY))
    assert notes.read_text() == "the user's" and _ids(out) == IDS
    notes.rename(tmp_path / "notes.txt")
    summary = prepare(PrepareConfig(out=out, overwrite=True, num_train=6, num_val=2, batch_size=4))
    assert not summary["skipped"] and summary["rows"] == 8
    assert len(_ids(out)) == 8 and storage.list_files(storage.join(out, "samples")) == sorted(
        commit.read_manifest(out)["tables"]["samples"]["files"])        # the old shards are gone
    with pytest.raises(OwnershipError, match="stage 'prepare', not 'masks'"):
        make_masks(MakeMasksConfig(seeds=str(tmp_path / "seeds"), data=str(tmp_path / "other"), out=out))


@pytest.mark.usefixtures("ray_local")
def test_killed_run_is_resumed_with_break_lock(tmp_path):
    full = str(tmp_path / "full")
    prepare(PrepareConfig(out=full, **TINY))
    # A run killed mid-way: its claim, part of its rows staged, and its lock left behind.
    out = str(tmp_path / "data")
    commit.claim(out, "prepare")
    staged = storage.join(commit.staging_uri(out, "samples"), "train-00000.parquet")  # one file made before the kill
    storage.write_bytes(staged, storage.read_bytes(storage.join(full, "samples", "train-00000.parquet")))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"run_id": "killed", "host": socket.gethostname(), "pid": dead.pid, "started": "2026-11-29T10:00:00Z",
              "stage": "prepare"}
    storage.write_bytes(storage.join(out, commit.LOCK_FILE), json.dumps(holder).encode())

    with pytest.raises(OutputLockedError, match=f"run killed, .*pid {dead.pid}.*looks dead.*--break-lock"):
        prepare(PrepareConfig(out=out, **TINY))
    summary = prepare(PrepareConfig(out=out, break_lock=True, **TINY))
    assert _ids(out) == IDS and summary["rows"] == len(IDS)
    assert not storage.exists(storage.join(out, commit.LOCK_FILE))
