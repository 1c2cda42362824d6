"""Image ids: the one rule that turns a source's name for an image into the ``image_id`` of its rows.

Listing (the prepare stage), the adapters (the rows they make) and resume (which skips the ids an
earlier run staged) all call :func:`image_id`, so a resumed run sees exactly the ids it wrote.

The names come from files anyone may have written (VOC split lists, a COCO ``file_name``) and are
joined to the source root, so :func:`path_problem` refuses every name that could reach outside it.
"""
from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable

# "s3://...", "file:...", "C:..." (a drive): a name must be a path below the source root, not a URI.
_SCHEME_OR_DRIVE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class UnsafeName(ValueError):
    """A source names an image by something that is not a path inside the source root."""


def path_problem(name: object) -> str | None:
    """Why ``name`` cannot be read as a file below the source root, or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a file name"
    if not name:
        return "is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if "\\" in name:
        return "contains a backslash (folders are separated by '/')"
    if name.startswith("/"):
        return "is an absolute path; names must be relative to the source root"
    if _SCHEME_OR_DRIVE.match(name):
        return "is a URI or a drive path; names must be relative to the source root"
    if ".." in name.split("/"):
        return "contains '..', which would reach outside the source root"
    if name.endswith("/"):
        return "names a folder, not a file"
    return None


def image_id(file_name: str) -> str:
    """The image id of an image file named relative to its source root: the file name's stem.

    ``"train2017/000000000790.jpg"`` -> ``"000000000790"``. Raises :class:`UnsafeName` for a name
    that :func:`path_problem` refuses, so no unsafe name ever becomes an id.
    """
    problem = path_problem(file_name)
    if problem:
        raise UnsafeName(f"{file_name!r} {problem}")
    stem = posixpath.basename(file_name).rsplit(".", 1)[0]  # not splitext: ".jpg" has no stem, not no extension
    if not stem:
        raise UnsafeName(f"{file_name!r} has no name before its extension")
    return stem


def duplicates(listed: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """{id: where each listing of it comes from} for the ids listed more than once, in listing order.

    ``listed`` holds (image id, where it was listed), e.g. ("2007_000032", "train.txt line 4").
    """
    places: dict[str, list[str]] = defaultdict(list)
    for image, where in listed:
        places[image].append(where)
    return {image: where for image, where in places.items() if len(where) > 1}
