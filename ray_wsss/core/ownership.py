"""Who may write an output URI, and when: the out-versus-inputs check and the run lock ``<out>/_LOCK``.

What a stage may delete inside its out is the commit protocol's journal (:mod:`ray_wsss.core.commit`).

- :func:`check_out_uri`: a bucket root is never an out; neither is an input of the stage or a folder
  inside one (local paths compared after ``realpath``, S3 URIs by path components, so
  ``s3://b/data2`` is not inside ``s3://b/data``).
- :class:`OutputLock`: a run owns its out while it writes. The lock is a JSON object (run id, host,
  pid, start time, stage) created atomically: ``O_EXCL`` locally, a conditional PUT
  (``If-None-Match: *``) on S3. A second run is refused with a message naming the holder. The lock
  is released when the run ends, by success or by an exception; a killed process leaves it behind
  (a stale lock), which only ``break_lock=True`` (``--break-lock``) removes. A holder on this host
  whose pid is still alive is never broken. Readers of committed outputs never look at locks.
- :func:`owns_output`: the decorator a stage's ``run(cfg)`` wears; both checks, around the whole run.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ray_wsss.core import storage
from ray_wsss.core.commit import LOCK_FILE
from ray_wsss.core.config import option
from ray_wsss.core.errors import OutputLockedError, OwnershipError
from ray_wsss.core.storage import StorageOptions

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# Outs whose lock this context (thread) holds: lets the harness check that a writer holds its lock.
_held: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("ray_wsss_held_locks", default=frozenset())


def check_out_uri(out: str, inputs: Iterable[str | None], contains_out: Iterable[str | None] = ()) -> None:
    """Refuse an out that is a bucket root, equal to or inside an input, or equal to one of ``contains_out``.

    ``inputs``: every URI the stage reads (``data``, ``seeds``, ``masks``, ``checkpoint``...; None
    skipped). ``contains_out``: inputs the out may sit inside but not equal (an evaluation writes
    ``<pred>/eval`` by default, a stage output of its own: see ray_wsss.core.commit).
    """
    if storage.is_bucket_root(out):
        raise OwnershipError(f"--out {out} is a bucket root: other data shares the bucket, so a stage never "
                             "writes (or resets) there; give a prefix, e.g. s3://bucket/runs/name")
    target = storage.path_components(out)
    for uri in (u for u in inputs if u):
        source = storage.path_components(uri)
        if target[:len(source)] == source:
            where = "is" if target == source else "is inside"
            raise OwnershipError(f"--out {out} {where} the stage's input {uri}: a stage never writes into what "
                                 "it reads (--overwrite would delete it); choose another --out")
    for uri in (u for u in contains_out if u):
        if target == storage.path_components(uri):
            raise OwnershipError(f"--out {out} is the stage's input {uri}; choose another --out")


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds an output's lock: the JSON in ``<out>/_LOCK``."""

    run_id: str
    host: str
    pid: int
    started: str
    stage: str

    @classmethod
    def mine(cls, stage: str) -> LockHolder:
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(),
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), stage)

    def describe(self) -> str:
        return f"stage {self.stage!r}, run {self.run_id}, host {self.host}, pid {self.pid}, started {self.started}"

    def alive(self) -> bool | None:
        """True/False when the holder runs on this host; None when that cannot be told (another host)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's live process
        return True


class OutputLock:
    """``<out>/_LOCK`` held by this run. Use as a context manager, or ``acquire()`` / ``release()``."""

    def __init__(self, out: str, stage: str, options: StorageOptions | None = None, break_lock: bool = False):
        self.out, self.stage, self.options, self.break_lock = out, stage, options, break_lock
        self.uri = storage.join(out, LOCK_FILE)
        self.holder: LockHolder | None = None

    def acquire(self) -> OutputLock:
        mine = LockHolder.mine(self.stage)
        body = json.dumps(dataclasses.asdict(mine), indent=2).encode()
        if not storage.create_exclusive(self.uri, body, self.options):
            other = self.current_holder()
            if not self.break_lock:
                raise OutputLockedError(self._refusal(other))
            self._break(other)
            if not storage.create_exclusive(self.uri, body, self.options):
                raise OutputLockedError(self._refusal(self.current_holder()) + " (it was taken again while breaking)")
        self.holder = mine
        _held.set(_held.get() | {self.out})
        log.info("locked %s for %s", self.out, mine.describe())
        return self

    def release(self) -> None:
        """Remove the lock if it is still ours (a ``--break-lock`` run may have taken it over)."""
        if self.holder is None:
            return
        try:
            current = self.current_holder()
            if current is not None and current.run_id == self.holder.run_id:
                storage.delete(self.uri, self.options)
            elif current is not None:
                log.warning("%s is now held by %s (broken by another run); leaving it", self.uri, current.describe())
        finally:
            self.holder = None
            _held.set(_held.get() - {self.out})

    def current_holder(self) -> LockHolder | None:
        """The lock's holder as written; None when there is no lock (or it cannot be parsed)."""
        try:
            return LockHolder(**json.loads(storage.read_bytes(self.uri, self.options)))
        except Exception:
            return None

    def _refusal(self, other: LockHolder | None) -> str:
        who = other.describe() if other else "an unknown holder (the lock is unreadable or was just written)"
        text = f"{self.out} is locked by another run ({who}); two runs must never write one output."
        alive = other.alive() if other else None
        if alive is False:
            text += (f" The holder looks dead (no pid {other.pid} on this host): if that run was killed, rerun with "
                     "--break-lock to take over (its staged work is resumed).")
        elif alive is None:
            text += (f" If that run is no longer running (killed), rerun with --break-lock; "
                     f"the lock is {self.uri}.")
        else:
            text += " It is still running on this host: wait for it to finish."
        return text

    def _break(self, other: LockHolder | None) -> None:
        if other is not None and other.alive():
            raise OutputLockedError(self._refusal(other) + " --break-lock does not break the lock of a live run.")
        log.warning("--break-lock: removing the stale lock %s of %s", self.uri,
                    other.describe() if other else "an unknown holder")
        storage.delete(self.uri, self.options)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def break_lock_option() -> Any:
    """A stage config's ``break_lock`` field (``--break-lock``)."""
    return option(False, "take over the lock (<out>/_LOCK) of a run that was killed; "
                         "refused while the holder still runs on this host")


def holds_lock(out: str) -> bool:
    """Whether this thread's run holds the lock of ``out``."""
    return out in _held.get()


def require_lock(out: str, stage: str) -> None:
    """A stage writes its out only while holding its lock: a programming error otherwise, caught early."""
    if not holds_lock(out):
        raise RuntimeError(f"stage {stage!r} would write {out} without holding its lock: "
                           "decorate its run() with ray_wsss.core.ownership.owns_output")


def owns_output(stage: str, inputs: Iterable[str] = (), contains_out: Iterable[str] = (),
                out: Callable[[Any], str] = lambda cfg: cfg.out) -> Callable[[F], F]:
    """Decorate a stage's ``run(cfg)``: check ``out`` against the inputs, then hold its lock for the whole run.

    ``inputs``/``contains_out``: names of ``cfg``'s URI fields (see :func:`check_out_uri`). The
    config's ``storage`` and ``break_lock`` fields are used when present.
    """
    input_fields, container_fields = tuple(inputs), tuple(contains_out)

    def decorate(run: F) -> F:
        @functools.wraps(run)
        def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            target = out(cfg)
            check_out_uri(target, [getattr(cfg, f) for f in input_fields],
                          [getattr(cfg, f) for f in container_fields])
            with OutputLock(target, stage, getattr(cfg, "storage", None), getattr(cfg, "break_lock", False)):
                return run(cfg, *args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate
