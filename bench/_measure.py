"""What the bench scripts measure, on Linux, with nothing but /proc: CPU seconds of this process and every
process it started (a local Ray: GCS, raylet, workers, actors), the driver's peak RSS, the object store's
usage, the load average.

CPU seconds rather than wall seconds: the machine these benches run on is shared, and CPU time barely
depends on the other load while wall time does (ratios of CPU seconds measured side by side hold up).

* :class:`CpuMonitor` follows ``utime + stime + cutime + cstime`` of this process and every descendant,
  keeping the last value of those that exit (see there).
* :class:`PeakRSS` resets the kernel's high-water mark (``/proc/self/clear_refs`` ``5``) and reads
  ``VmHWM``: the exact peak between the two.
* :class:`ObjectStoreMonitor` follows the raylet's own periodic "Plasma store debug dump" lines
  (``Current usage: X / Y GB``) in its ``raylet.out``; they come every ``RAY_event_stats_print_interval_ms``,
  which :func:`ray_env` sets to 200 ms before Ray starts. Without the dashboard and grpcio there is no other
  way in: ``ray._private.internal_api.memory_summary`` needs grpcio, the state API the dashboard, and
  ``ray.available_resources()["object_store_memory"]`` does not go down when objects are stored.
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

TICKS = os.sysconf("SC_CLK_TCK")
STORE_DUMP_MS = 200
_USAGE = re.compile(r"Current usage: ([0-9.e+-]+) / ([0-9.e+-]+) GB")


def ray_env() -> None:
    """Before ``ray.init``: the raylet dumps its object store usage every STORE_DUMP_MS."""
    os.environ["RAY_event_stats_print_interval_ms"] = str(STORE_DUMP_MS)


def _stat(pid: int) -> tuple[int, float, str] | None:
    """(parent pid, CPU seconds incl. reaped children, name) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), sum(int(v) for v in fields[11:15]) / TICKS, name


def _name(pid: int, comm: str) -> str:
    """What a process is doing now: Ray's process title (``ray::MapBatches(...)``, ``ray::IDLE``) cut at its
    first ``(`` or ``.``, else the executable's name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return comm
    if title.startswith("ray::"):
        return re.split(r"[(.\s]", title, maxsplit=1)[0]
    return comm


class CpuMonitor:
    """CPU seconds of this process and all its descendants, dead ones included, by what each was doing.

    Ray's raylet does not account its reaped workers in its ``cutime``, so an actor that exits takes its CPU
    time with it. A thread therefore reads every known process of the tree each ``period`` seconds (and
    looks for new ones every ``scan_every`` periods) and adds each one's CPU since the last read to the name
    it has now (a Ray worker is retitled per task: ``ray::IDLE``, ``ray::MapBatches``, ``ray::RayTrainWorker``):
    an exited process loses at most one period of CPU. The thread's own CPU is counted apart (``monitor``).
    """

    def __init__(self, period: float = 0.1, scan_every: int = 5):
        self.root = os.getpid()
        self.period, self.scan_every = period, scan_every
        self.last: dict[int, float] = {}  # pid -> CPU seconds at the last read
        self.by_name: dict[str, float] = {}  # name -> CPU seconds so far
        self.own_cpu = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._read(self._tree())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        """The pids of this process and all its descendants, from /proc."""
        parents = {pid: s[0] for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if (s := _stat(pid))}
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree

    def _read(self, pids: list[int]) -> None:
        with self._lock:
            for pid in pids:
                if (s := _stat(pid)) is None:
                    continue
                name = "driver" if pid == self.root else _name(pid, s[2])
                self.by_name[name] = self.by_name.get(name, 0.0) + s[1] - self.last.get(pid, 0.0)
                self.last[pid] = s[1]

    def _run(self) -> None:
        count = 0
        while not self._stop.wait(self.period):
            started = time.thread_time()
            self._read(self._tree() if count % self.scan_every == 0 else list(self.last))
            count += 1
            with self._lock:
                self.own_cpu += time.thread_time() - started

    def snapshot(self) -> tuple[dict[str, float], float]:
        """(CPU seconds so far by name, this monitor's CPU so far), after a fresh read of the whole tree."""
        self._read(self._tree())
        with self._lock:
            return dict(self.by_name), self.own_cpu

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_delta(before: tuple[dict, float], after: tuple[dict, float]) -> dict:
    """CPU seconds between two snapshots: driver (less the monitor's own), Ray workers and actors, Ray's own
    processes, the total, and the workers' seconds by what they ran (``workers_by_name``)."""
    (start, own_start), (end, own_end) = before, after
    spent = {name: cpu - start.get(name, 0.0) for name, cpu in end.items()}
    monitor = own_end - own_start
    workers = {name[len("ray::"):]: round(v, 2) for name, v in sorted(spent.items(), key=lambda kv: -kv[1])
               if name.startswith("ray::") and v >= 0.01}
    parts = {"driver": spent.get("driver", 0.0) - monitor,
             "ray workers": sum(v for name, v in spent.items() if name.startswith("ray::")),
             "ray system": sum(v for name, v in spent.items() if name != "driver" and not name.startswith("ray::"))}
    return {**{k: round(v, 2) for k, v in parts.items()}, "total": round(sum(parts.values()), 2),
            "monitor": round(monitor, 2), "workers_by_name": workers}


class PeakRSS:
    """This process's peak resident memory since :meth:`reset` (kernel high-water mark), in MB."""

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def peak_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status")


class ObjectStoreMonitor:
    """The object store's usage over time, read from the raylet's debug dumps (see the module doc)."""

    def __init__(self, logs_dir: str):
        self.path = os.path.join(logs_dir, "raylet.out")
        self.samples: list[tuple[float, float]] = []  # (time, bytes used)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    @classmethod
    def for_current_ray(cls) -> ObjectStoreMonitor:
        import ray

        node = ray._private.worker.global_worker.node
        return cls(node.get_logs_dir_path())

    def _follow(self) -> None:
        offset = 0
        while not self._stop.is_set():
            try:
                with open(self.path) as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
            except OSError:
                chunk = ""
            now = time.time()
            for match in _USAGE.finditer(chunk):
                self.samples.append((now, float(match.group(1)) * 1e9))
            self._stop.wait(STORE_DUMP_MS / 2000)

    def peak_bytes(self, start: float, end: float) -> float:
        """Largest usage seen in [start, end + one dump period] (0 when nothing was stored)."""
        window = [b for t, b in self.samples if start <= t <= end + 2 * STORE_DUMP_MS / 1000]
        return max(window, default=0.0)

    def usage_at(self, when: float) -> float:
        """The last usage seen before ``when`` (what earlier work left in the store)."""
        before = [b for t, b in self.samples if t <= when]
        return before[-1] if before else 0.0

    def dumps_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t, _ in self.samples)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def measured(cpu: CpuMonitor, store: ObjectStoreMonitor | None = None) -> Iterator[dict]:
    """Measure a block: wall and CPU seconds (whole process tree, split by role), driver peak RSS, object
    store peak, load average before and after. The dict is filled when the block ends."""
    result: dict = {}
    rss = PeakRSS()
    rss.reset()
    load_before = os.getloadavg()
    cpu_before = cpu.snapshot()
    start = time.time()
    yield result
    end = time.time()
    cpu_after = cpu.snapshot()
    time.sleep(2 * STORE_DUMP_MS / 1000 if store else 0)  # the dump that covers the block's end
    result.update(wall_s=round(end - start, 2), cpu_s=cpu_delta(cpu_before, cpu_after),
                  driver_peak_rss_mb=round(rss.peak_mb(), 1), load_before=[round(x, 1) for x in load_before],
                  load_after=[round(x, 1) for x in os.getloadavg()], start=start, end=end)
    if store is not None:
        result["store_peak_mb"] = round(store.peak_bytes(start, end) / 1e6, 3)
        result["store_at_start_mb"] = round(store.usage_at(start) / 1e6, 3)
        result["store_dumps"] = store.dumps_between(start, end)

