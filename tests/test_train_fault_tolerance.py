"""A Train worker killed mid-run: Ray Train restarts the worker group and training resumes from the checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from fixtures_train import controller_messages, read_metrics, tiny_config, tiny_data, train_worker_pids, worker_lines

from ray_wsss.stages import train_acr

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
EPOCHS = 3
TIMEOUT_S = 600  # generous: the test machine is shared


@pytest.fixture(scope="module")
def train_data(ray_local, tmp_path_factory) -> str:
    return tiny_data(tmp_path_factory.getbasetemp())


def _registered_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint the controller has registered, from its snapshot: what a restart resumes from."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being written
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest and latest["checkpoint_dir_name"]


def _wait_for(condition, thread: threading.Thread, what: str):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert thread.is_alive(), f"the training run ended before {what}"
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def test_killed_worker_resumes_from_last_checkpoint(train_data, tmp_path):
    cfg = tiny_config(train_data, str(tmp_path), epochs=EPOCHS, max_failures=1, name="ft")
    run_dir = tmp_path / cfg.name
    result: dict = {}

    def train() -> None:
        try:
            result["summary"] = train_acr.run(cfg)
        except BaseException as err:
            result["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    # Look the worker up before the checkpoint exists, so the kill lands right after it is registered.
    pids = _wait_for(train_worker_pids, thread, "the Train worker started")
    assert len(pids) == 1, f"expected one Train worker, found PIDs {pids}"
    killed_pid = pids.pop()
    ckpt_name = _wait_for(lambda: _registered_checkpoint(run_dir), thread, "the first checkpoint was registered")
    try:
        os.kill(killed_pid, signal.SIGKILL)
    except ProcessLookupError:
        pytest.fail(f"the Train worker (PID {killed_pid}) had already exited: the run ended before the kill")
    rows_at_kill = read_metrics(str(run_dir / ckpt_name))

    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    if "error" in result:
        raise result["error"]
    summary = result["summary"]

    # Finished with the planned epochs, each once, and the rows before the kill restored, not retrained.
    assert summary["epochs"] == EPOCHS
    rows = read_metrics(cfg.out)
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    assert 1 <= len(rows_at_kill) < EPOCHS
    assert rows[:len(rows_at_kill)] == rows_at_kill

    # The controller spent the one allowed failure on a retry, and the new worker said it resumed, then
    # trained only the remaining epochs.
    retries = [m for m in controller_messages(cfg.name) if "[FailurePolicy] RETRY" in m]
    assert len(retries) == 1 and "Error count: 1 (max allowed: 1)" in retries[0], retries
    resumed_logs = worker_lines(f"[train] resuming from checkpoint {run_dir}{os.sep}")
    assert len(resumed_logs) == 1, f"expected one worker log saying it resumed, found {list(resumed_logs)}"
    [(log_file, lines)] = resumed_logs.items()
    assert not log_file.endswith(f"-{killed_pid}.out")
    assert killed_pid not in train_worker_pids()
    resume_at = next(i for i, line in enumerate(lines) if "[train] resuming from checkpoint" in line)
    done_before = int(re.search(r"\(epoch (\d+) done\)", lines[resume_at]).group(1))
    assert done_before >= len(rows_at_kill)
    epochs_after_kill = [line for line in lines[resume_at:] if "[train] epoch=" in line]
    assert len(epochs_after_kill) == EPOCHS - done_before < EPOCHS
