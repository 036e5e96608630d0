"""A reader writes its own states into the run of the checkpoint being written.

The driver opens the version's MLflow run and hands each reader a ``StateTarget``; the reader
serialises its states one at a time (spilled ones read back one at a time), uploads those it has
not uploaded before (the same key with the same sha256), and returns their manifest entries as
compact JSON, about 200 bytes a state. So a checkpoint holds one state at a time on each reader
and a few hundred bytes a state on the driver, however many keys the readers hold
(``configs/cluster.yaml``: 8 readers x 1,024 keys of 2.4 MB to 63 MB each).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Iterable

from actors.call_types import StateBlob, StateTarget


def state_file_name(key: str) -> str:
    """A state's file name, spilled (actors.state_store) or in a checkpoint: keys are names the
    user chose, so the file is their hash."""
    return f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def state_file(reader: str, key: str) -> str:
    """A state's file in a checkpoint, under its reader's folder."""
    return f"states/{reader}/{state_file_name(key)}"


def manifest_entry(blob: StateBlob) -> dict[str, Any]:
    return {"key": blob.key, "sha256": blob.sha256, "documents": blob.documents, "partition": blob.partition,
            "last_read": blob.last_read}


class StateUploader:
    """One reader's side of checkpoints: what it uploaded, so that an unchanged state is named,
    not written again (incremental checkpoints). A file holds one key's state: erasing a key
    (``forget``) deletes no file another key reads."""

    def __init__(self, reader: str):
        self.reader = reader
        self._uploaded: dict[str, tuple[str, str, str]] = {}  # key -> (sha256, run id, file)

    def write(self, blobs: Iterable[StateBlob], target: StateTarget) -> bytes:
        """Upload each of ``blobs`` (an iterator: one in memory at a time) not uploaded before;
        the manifest entries of all of them, in their order, as a JSON list."""
        entries, held = [], {}
        with tempfile.TemporaryDirectory(prefix="ttt-states-") as tmp:
            for blob in blobs:
                entry = manifest_entry(blob)
                done = self._uploaded.get(blob.key)
                if done is not None and done[0] == blob.sha256:  # unchanged since a checkpoint
                    run_id, entry["file"] = done[1], done[2]
                    if run_id != target.run_id:
                        entry["run_id"] = run_id  # where the file lies; none: in this version's run
                else:
                    run_id, entry["file"] = target.run_id, state_file(self.reader, blob.key)
                    staged = Path(tmp) / Path(entry["file"]).name
                    staged.write_bytes(blob.data)
                    target.artifacts.log_artifact(str(staged), f"{target.folder}/{Path(entry['file']).parent}")
                    staged.unlink()
                held[blob.key] = (blob.sha256, run_id, entry["file"])
                entries.append(json.dumps(entry, separators=(",", ":"), sort_keys=True))
        self._uploaded = held  # keys no longer held (expired, forgotten) go
        return ("[" + ",".join(entries) + "]").encode()

    def forget(self, key: str) -> None:
        self._uploaded.pop(key, None)
