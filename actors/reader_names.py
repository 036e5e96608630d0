"""The names of a stream's readers: the Ray actors' names, the keys of a checkpoint's states and
the folders of their spill files. Before the rename (docs/upgrading.md) a reader was
``<stream>-worker-<i>``: ``current_name`` reads such a name as the reader's name now."""

from __future__ import annotations

import re

_BEFORE_THE_RENAME = re.compile(r"^(?P<stream>.+)-worker-(?P<index>\d+)$")


def reader_name(stream: str, index: int) -> str:
    return f"{stream}-reader-{index}"


def current_name(name: str) -> str:
    """``name`` as the reader is named now (a name from before the rename mapped, any other as is)."""
    return _BEFORE_THE_RENAME.sub(r"\g<stream>-reader-\g<index>", name)


def name_before_the_rename(name: str) -> str:
    """The name the reader ``name`` had before the rename (where its spill files may still lie)."""
    return re.sub(r"-reader-(\d+)$", r"-worker-\1", name)
