"""Errors with enough context for a user to find the bad record or file."""
from __future__ import annotations


class WsssError(Exception):
    """Base class for errors raised by ray_wsss."""


class RecordError(WsssError):
    """One input record could not be processed. Batch stages turn it into an errors-table row."""

    def __init__(self, image_id: str, message: str):
        super().__init__(f"{image_id}: {message}")
        self.image_id = image_id
        self.message = message


class StageNotCommittedError(WsssError):
    """A stage's output is missing or was never committed (crashed or still running)."""


class TooManyErrorsError(WsssError):
    """A batch job produced more per-record errors than --max-errors allows."""


class OwnershipError(WsssError):
    """An output URI a stage may not write or delete: foreign files, another stage's output, an input, a bucket root."""


class OutputLockedError(WsssError):
    """Another run holds the output's lock (``<out>/_LOCK``)."""
