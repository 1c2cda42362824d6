"""Ownership of a stage's --out (Ray-free): what --overwrite may delete, out-versus-input checks, the run lock."""
import json
import os
import socket
import subprocess
import sys
import threading

import pyarrow as pa
import pytest

from ray_wsss.core import commit, schema, storage
from ray_wsss.core.errors import OutputLockedError, OwnershipError, WsssError
from ray_wsss.core.ownership import OutputLock, check_out_uri, holds_lock, owns_output


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3_bucket") + "/runs"


def _errors_table(ids):
    return pa.table({"image_id": ids, "stage": ["t"] * len(ids), "error": ["boom"] * len(ids)},
                    schema=schema.ERRORS)


def _snapshot(uri):
    """{relative path: bytes} of every file below ``uri``."""
    return {rel: storage.read_bytes(storage.join(uri, rel)) for rel in storage.list_files(uri)}


def _committed_stage(out, stage="masks"):
    """A committed batch stage with a side file written after the commit, like the contact sheets."""
    commit.claim(out, stage)
    commit.write_staged_table(out, "errors", _errors_table(["a", "b"]))
    commit.commit_stage(out, ["errors"], {"table": "errors"}, make_summary=lambda m: {"rows": 2}, stage=stage)
    commit.write_output(out, "contact_sheet.png", b"png")


def _user_files(uri):
    storage.write_bytes(storage.join(uri, "notes.txt"), b"my notes")
    storage.write_bytes(storage.join(uri, "photos", "cat.jpg"), b"\xff\xd8 a cat")


# ---------------------------------------------------------------- --overwrite deletes only what the stage wrote

def test_foreign_directory_is_refused_and_untouched(root):
    out = storage.join(root, "mine")
    _user_files(out)
    before = _snapshot(out)
    with pytest.raises(OwnershipError, match=r"not empty and holds no stage output.*notes.txt.*photos"):
        commit.reset_stage(out, stage="masks")
    with pytest.raises(OwnershipError, match="holds no stage output"):
        commit.claim(out, "masks")
    assert _snapshot(out) == before


def test_bucket_root_is_never_an_out(s3_bucket):
    storage.write_bytes(s3_bucket + "/other-team/table.csv", b"a,b\n1,2\n")
    before = _snapshot(s3_bucket)
    for out in (s3_bucket, s3_bucket + "/"):
        with pytest.raises(OwnershipError, match="bucket root"):
            check_out_uri(out, [])
        with pytest.raises(WsssError, match="bucket root"):
            storage.delete(out)
    with pytest.raises(OwnershipError, match=r"holds no stage output.*other-team"):
        commit.reset_stage(s3_bucket)
    assert _snapshot(s3_bucket) == before


def test_reset_deletes_exactly_the_journaled_files_and_nested_evaluation(root):
    out = storage.join(root, "masks")
    _committed_stage(out)
    evaluation = storage.join(out, "eval")  # the evaluate stage's default out: <pred>/eval
    commit.claim(evaluation, "evaluate", inputs=[out + "/", storage.join(root, "data")])
    commit.write_output(evaluation, "summary.json", b"{}")
    commit.commit_outputs(evaluation, "evaluate", {})
    storage.write_bytes(storage.join(root, "beside.txt"), b"next to the out, not in it")
    assert sorted(commit.read_journal(out).files) == sorted(
        ["contact_sheet.png", "dataset.json", "summary.json"]
        + [f"errors/{n}" for n in commit.read_manifest(out)["tables"]["errors"]["files"]])

    commit.reset_stage(out, stage="masks")
    assert storage.list_files(out) == []
    assert storage.read_bytes(storage.join(root, "beside.txt")) == b"next to the out, not in it"
    commit.claim(out, "masks")  # the emptied out is the stage's again


@pytest.mark.parametrize("where", ["notes.txt", "errors/stray.parquet", "eval/notes.txt"])
def test_reset_refuses_when_unknown_files_remain_and_deletes_nothing(root, where):
    out = storage.join(root, "masks")
    _committed_stage(out)
    if where.startswith("eval/"):
        commit.claim(storage.join(out, "eval"), "evaluate", inputs=[out])
        commit.commit_outputs(storage.join(out, "eval"), "evaluate", {})
    storage.write_bytes(storage.join(out, where), b"the user's")
    before = _snapshot(out)
    with pytest.raises(OwnershipError, match=f"--overwrite refused.*{where.split('/')[-1]}.*move these"):
        commit.reset_stage(out, stage="masks")
    assert _snapshot(out) == before
    assert commit.is_committed(out)


def test_an_evaluation_without_journal_blocks_the_reset(tmp_path):
    # An eval/summary.json written outside the protocol is not the stage's: named, kept.
    out = str(tmp_path / "seeds")
    _committed_stage(out, "seeds")
    storage.write_json(storage.join(out, "eval", "summary.json"), {"miou": 0.3})
    with pytest.raises(OwnershipError, match=r"eval/summary.json"):
        commit.reset_stage(out, stage="seeds")


def test_a_nested_output_that_does_not_read_the_stage_blocks_the_reset(tmp_path):
    out = str(tmp_path / "seeds")
    _committed_stage(out, "seeds")
    other = storage.join(out, "prepared")  # some other stage's output, put inside by hand
    commit.claim(other, "prepare", inputs=[str(tmp_path / "VOC2012")])
    commit.write_output(other, "dataset.json", b"{}")
    before = _snapshot(out)
    with pytest.raises(OwnershipError, match=r"prepared holds the output of stage 'prepare', which does not read"):
        commit.reset_stage(out, stage="seeds")
    assert _snapshot(out) == before


def test_a_locked_nested_output_blocks_the_reset(tmp_path):
    out = str(tmp_path / "seeds")
    _committed_stage(out, "seeds")
    with OutputLock(storage.join(out, "eval"), "evaluate"):
        commit.claim(storage.join(out, "eval"), "evaluate")
        with pytest.raises(OwnershipError, match=r"a job is writing inside .*eval/_LOCK"):
            commit.reset_stage(out, stage="seeds")
    assert commit.is_committed(out)


def test_another_stages_output_is_refused(root):
    out = storage.join(root, "seeds")
    _committed_stage(out, "seeds")
    with pytest.raises(OwnershipError, match="holds the output of stage 'seeds', not 'masks'"):
        commit.reset_stage(out, stage="masks")
    with pytest.raises(OwnershipError, match="holds the output of stage 'seeds', not 'masks'"):
        commit.claim(out, "masks")
    assert commit.is_committed(out)


def test_a_stage_never_replaces_a_file_it_did_not_write(tmp_path):
    out = str(tmp_path / "seeds")
    commit.claim(out, "seeds")
    storage.write_bytes(storage.join(out, "summary.json"), b"the user's summary")
    commit.write_staged_table(out, "errors", _errors_table(["a"]))
    with pytest.raises(OwnershipError, match=r"summary.json exist.*did not write them"):
        commit.commit_stage(out, ["errors"], {}, make_summary=lambda m: {}, stage="seeds")
    assert storage.read_bytes(storage.join(out, "summary.json")) == b"the user's summary"
    assert not commit.is_committed(out)


def test_crashed_training_out_is_owned_resumable_and_resettable(root):
    # Ray Train names its own files under <out>/<name>/: the folder is claimed before training starts.
    out = storage.join(root, "train")
    commit.claim(out, "train", dirs=["run"])
    storage.write_bytes(storage.join(out, "run", "checkpoint_000000", "model.pt"), b"weights")
    storage.write_bytes(storage.join(out, "run", ".validate_storage_marker"), b"")
    # ...the driver is killed here: nothing committed, the out is still the stage's
    assert not commit.is_committed(out)
    assert commit.read_journal(out).dirs == {"run"}
    with pytest.raises(OwnershipError, match="stage 'train', not 'deeplab'"):
        commit.claim(out, "deeplab", dirs=["run"])
    commit.claim(out, "train", dirs=["run"])  # the rerun resumes: same claim, files kept
    assert storage.read_bytes(storage.join(out, "run", "checkpoint_000000", "model.pt")) == b"weights"

    commit.write_output(out, "summary.json", b"{}")
    manifest = commit.commit_outputs(out, "train", {"checkpoint": storage.join(out, "run", "checkpoint_000000")})
    assert manifest["dirs"] == ["run"] and manifest["files"] == ["summary.json"]
    assert storage.list_files(storage.join(out, commit.STAGING_DIR)) == []
    commit.reset_stage(out, stage="train")
    assert storage.list_files(out) == []


def test_a_journal_naming_paths_outside_the_out_is_not_trusted(tmp_path):
    out = str(tmp_path / "masks")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    _committed_stage(out)
    manifest = commit.read_manifest(out)
    storage.write_json(storage.join(out, commit.SUCCESS_FILE), {**manifest, "files": ["../victim.txt"]})
    with pytest.raises(OwnershipError, match="not a path inside it"):
        commit.reset_stage(out, stage="masks")
    assert victim.read_text() == "keep me"


# ---------------------------------------------------------------- --out versus the inputs

def test_out_equal_to_or_inside_an_input_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(OwnershipError, match="is the stage's input"):
        check_out_uri(str(data), [str(tmp_path / "seeds"), str(data)])
    with pytest.raises(OwnershipError, match="is inside the stage's input"):
        check_out_uri(str(data / "masks"), [str(data) + "/"])
    os.symlink(data, tmp_path / "alias")
    with pytest.raises(OwnershipError, match="is the stage's input"):
        check_out_uri(str(tmp_path / "alias"), [str(data)])           # the same folder through a link
    with pytest.raises(OwnershipError, match="is inside"):
        check_out_uri(str(tmp_path / "x" / ".." / "data" / "m"), [str(data)])
    check_out_uri(str(tmp_path / "data2"), [str(data), None])          # a sibling with a longer name
    check_out_uri(str(tmp_path), [str(data)])                          # an input inside the out is no write into it


def test_s3_out_is_compared_by_path_components():
    with pytest.raises(OwnershipError, match="is the stage's input"):
        check_out_uri("s3://b/data/", ["s3://b/data"])
    with pytest.raises(OwnershipError, match="is inside"):
        check_out_uri("s3://b/data//masks", ["s3://b/data"])
    check_out_uri("s3://b/data2", ["s3://b/data"])
    check_out_uri("s3://c/data/masks", ["s3://b/data", "/data"])


def test_evaluation_may_sit_inside_the_stage_it_scores_but_not_be_it():
    check_out_uri("s3://b/seeds/eval", ["s3://b/data"], contains_out=["s3://b/seeds"])
    with pytest.raises(OwnershipError, match="is the stage's input"):
        check_out_uri("s3://b/seeds", ["s3://b/data"], contains_out=["s3://b/seeds/"])


# ---------------------------------------------------------------- the run lock

def _contend(out, rounds):
    """Two acquirers released together by a barrier, ``rounds`` times -> list of (winners, refusals)."""
    results = []
    for i in range(rounds):
        target = storage.join(out, f"r{i}")
        barrier, outcomes = threading.Barrier(2), []

        def attempt(barrier=barrier, outcomes=outcomes, target=target):
            barrier.wait()
            try:
                outcomes.append(OutputLock(target, "masks").acquire())
            except OutputLockedError as err:
                outcomes.append(err)
        threads = [threading.Thread(target=attempt) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results.append(outcomes)
    return results


def test_lock_is_exclusive(root):
    for outcomes in _contend(root, rounds=8 if root.startswith("s3://") else 40):
        winners = [o for o in outcomes if isinstance(o, OutputLock)]
        assert len(winners) == 1, outcomes
        (refusal,) = [o for o in outcomes if isinstance(o, OutputLockedError)]
        holder = winners[0].holder
        for part in (holder.run_id, holder.host, str(holder.pid), holder.started, "'masks'"):
            assert part in str(refusal)
        winners[0].release()


def test_lock_is_released_on_success_and_on_exception(root):
    out = storage.join(root, "masks")
    with OutputLock(out, "masks"):
        assert holds_lock(out) and storage.exists(storage.join(out, commit.LOCK_FILE))
    assert not storage.exists(storage.join(out, commit.LOCK_FILE)) and not holds_lock(out)
    with pytest.raises(RuntimeError, match="boom"):
        with OutputLock(out, "masks"):
            raise RuntimeError("boom")
    assert not storage.exists(storage.join(out, commit.LOCK_FILE))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant_lock(out, **fields):
    holder = {"run_id": "deadbeef", "host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-01-01T00:00:00Z",
              "stage": "masks", **fields}
    storage.write_bytes(storage.join(out, commit.LOCK_FILE), json.dumps(holder).encode())
    return holder


def test_stale_lock_is_broken_only_with_the_flag(root):
    out = storage.join(root, "masks")
    holder = _plant_lock(out)
    with pytest.raises(OutputLockedError, match=rf"run deadbeef, host .*pid {holder['pid']}.*looks dead.*--break-lock"):
        OutputLock(out, "masks").acquire()
    assert json.loads(storage.read_bytes(storage.join(out, commit.LOCK_FILE)))["run_id"] == "deadbeef"
    with OutputLock(out, "masks", break_lock=True) as lock:
        assert json.loads(storage.read_bytes(lock.uri))["run_id"] == lock.holder.run_id
    assert not storage.exists(storage.join(out, commit.LOCK_FILE))


def test_lock_of_another_host_names_it_and_can_be_broken(tmp_path):
    out = str(tmp_path / "masks")
    _plant_lock(out, host="node-7", pid=1)
    with pytest.raises(OutputLockedError, match=r"host node-7, pid 1.*no longer running.*--break-lock"):
        OutputLock(out, "masks").acquire()
    OutputLock(out, "masks", break_lock=True).acquire().release()


def test_break_lock_never_breaks_a_live_run_on_this_host(tmp_path):
    out = str(tmp_path / "masks")
    with OutputLock(out, "masks") as first:
        with pytest.raises(OutputLockedError, match=r"still running on this host.*does not break"):
            OutputLock(out, "masks", break_lock=True).acquire()
        assert json.loads(storage.read_bytes(first.uri))["run_id"] == first.holder.run_id


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path):
    out = str(tmp_path / "masks")
    lock = OutputLock(out, "masks").acquire()
    storage.delete(lock.uri)
    _plant_lock(out, run_id="newer", host="node-7")  # a --break-lock run on another host took it
    lock.release()
    assert json.loads(storage.read_bytes(lock.uri))["run_id"] == "newer"


def test_owns_output_checks_inputs_and_holds_the_lock_for_the_run(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        data: str
        out: str
        break_lock: bool = False

    seen = []

    @owns_output("masks", inputs=("data",))
    def run(cfg):
        seen.append(holds_lock(cfg.out))
        raise ValueError("the stage failed")

    data = str(tmp_path / "data")
    with pytest.raises(OwnershipError, match="is inside the stage's input"):
        run(Cfg(data=data, out=data + "/masks"))
    with pytest.raises(ValueError, match="the stage failed"):
        run(Cfg(data=data, out=str(tmp_path / "masks")))
    assert seen == [True] and not storage.exists(str(tmp_path / "masks" / commit.LOCK_FILE))


# ---------------------------------------------------------------- damaged committed data

@pytest.mark.parametrize("sizes_recorded", [True, False])
def test_truncated_committed_parquet_names_the_file_and_its_stage(root, sizes_recorded):
    out = storage.join(root, "seeds")
    _committed_stage(out, "seeds")
    manifest = commit.read_manifest(out)
    if not sizes_recorded:  # a manifest from before sizes were recorded: the footer is read instead
        del manifest["tables"]["errors"]["sizes"]
        storage.write_json(storage.join(out, commit.SUCCESS_FILE), manifest)
    (name,) = manifest["tables"]["errors"]["files"]
    uri = storage.join(out, "errors", name)
    storage.write_bytes(uri, storage.read_bytes(uri)[:40])
    pattern = rf"{uri} .*table 'errors' in the committed output of stage 'seeds' at {out}.*--overwrite"
    with pytest.raises(WsssError, match=pattern):
        commit.read_table(out, "errors")
    with pytest.raises(WsssError, match=pattern):
        commit.read_first_rows(out, "errors", 1)
    from ray_wsss.harness.batch_stage import committed_files  # how every batch stage opens its inputs

    with pytest.raises(WsssError, match=pattern):
        committed_files(out, "errors", None)
