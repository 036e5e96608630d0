"""Which reader takes which checkpointed state, when the readers reading on are not the ones
that wrote the checkpoint (``processor.readers`` changed between runs: 2 -> 3, 3 -> 1).

States follow partitions, the way Flink's keyed state follows key groups: the partition ->
reader assignment of this run decides where each state goes.

- ``per_key``: every key's state goes to the reader that now owns the partition of the key's
  last document (recorded with the state). Nothing is lost or duplicated. A key read from two
  partitions (its producer changed partitioner, or records without a key) has one state on each
  reader that read it; if the new assignment brings two of them onto one reader, the one that
  absorbed more documents is kept, and the log says which was dropped.
- ``global`` and ``per_document`` (one state per reader, learned from that reader's partitions;
  per_document keeps only its slow weights across documents): a reader takes the state of the
  old reader that read the lowest-numbered of its partitions. 2 -> 3: the new third reader
  starts from a copy of the state of the reader its first partition came from; 3 -> 1: the one
  reader goes on with reader 0's state and the others' are dropped (logged). No merge: two sets of
  slow weights (low-rank factors) have no faithful average.

With the same readers and assignment as the checkpoint, every reader takes back its own states.
"""

from __future__ import annotations

import logging
import re

from dataclasses import replace

from actors.call_types import StateBlob
from actors.assignment import assign_partitions
from pipeline.state.checkpoint import Checkpoint, CheckpointError

log = logging.getLogger(__name__)

# The learner's name in a checkpoint: ``<stream>-learner`` (actors.supervisor names it).
LEARNER_SUFFIX = "-learner"


def split_learner(checkpoint: Checkpoint, learner: str | None) -> tuple[Checkpoint, list[StateBlob]]:
    """(the checkpoint with the readers' states only, the states of ``learner``). A version
    written with a learner restores only with one, and the other way round: one holds the
    stream's slow weights on the learner, the other on each reader."""
    where = f"v{checkpoint.version}"
    held = [name for name in checkpoint.states if name.endswith(LEARNER_SUFFIX)]
    if learner is None:
        if held:
            raise CheckpointError(f"{where} was written with processor.learner (the slow weights are on {held[0]}): "
                                  "set processor.learner.enabled: true to read on from it")
        return checkpoint, []
    if not held and any(checkpoint.states.values()):
        raise CheckpointError(f"{where} was written without processor.learner (each reader held its own slow weights): "
                              "read on from it with processor.learner.enabled: false, or start a new stream")
    if held and held != [learner]:
        raise CheckpointError(f"{where} holds the learner {held[0]}, this run's is {learner}")
    readers = {name: blobs for name, blobs in checkpoint.states.items() if name != learner}
    return replace(checkpoint, states=readers), list(checkpoint.states.get(learner, []))


def checkpoint_assignment(checkpoint: Checkpoint) -> dict[int, str]:
    """Partition -> the reader name that read it when the checkpoint was written (older
    checkpoints without the record: the round robin of their readers, as ``assign_partitions``)."""
    recorded = checkpoint.manifest.get("assignment")
    if recorded:
        return {int(p): w for p, w in recorded.items()}
    names = sorted(checkpoint.states, key=_reader_index)
    partitions = sorted(checkpoint.offsets)
    return {p: names[w] for p, w in assign_partitions(partitions, len(names)).items()} if names else {}


def states_for_readers(checkpoint: Checkpoint, names: list[str], reader_of: dict[int, int],
                       scope: str) -> dict[str, list[StateBlob]]:
    """Reader name -> the states it restores, for this run's readers ``names`` and partition ->
    reader index ``reader_of``. Raises CheckpointError where a state has no place."""
    old_owner = checkpoint_assignment(checkpoint)
    same_layout = set(checkpoint.states) <= set(names) and all(
        old_owner.get(p) in (None, names[w]) for p, w in reader_of.items())
    if same_layout:
        return {name: list(checkpoint.states.get(name, [])) for name in names}
    where = f"v{checkpoint.version}"
    if scope == "per_key":
        return _keys_to_partition_owners(checkpoint, names, reader_of, where)
    out: dict[str, list[StateBlob]] = {}
    taken = set()
    for w, name in enumerate(names):
        mine = sorted(p for p, i in reader_of.items() if i == w)
        source = old_owner.get(mine[0]) if mine else None
        out[name] = list(checkpoint.states.get(source, [])) if source else []
        taken.add(source)
        log.info("rescaling from %s: %s takes the state of %s (its partition %s)", where, name, source or "nobody",
                 mine[0] if mine else "-")
    dropped = sorted(set(checkpoint.states) - taken)
    if dropped:
        log.warning("rescaling from %s (%s scope): the states of %s are dropped (the rule: a reader takes the state "
                    "of the old reader that read its lowest partition)", where, scope, ", ".join(dropped))
    return out


def _keys_to_partition_owners(checkpoint: Checkpoint, names: list[str], reader_of: dict[int, int],
                              where: str) -> dict[str, list[StateBlob]]:
    chosen: dict[tuple[str, str], StateBlob] = {}
    for old, blobs in sorted(checkpoint.states.items()):
        for blob in blobs:
            if blob.partition is None:
                raise CheckpointError(f"{where}: the state of key {blob.key!r} on {old} does not record its partition "
                                      f"(written before rescaling was supported): run with processor.readers = "
                                      f"{len(checkpoint.states)}")
            if blob.partition not in reader_of:
                raise CheckpointError(f"{where}: the state of key {blob.key!r} comes from partition {blob.partition}, "
                                      f"which this run does not read (partitions {sorted(reader_of)})")
            target = (names[reader_of[blob.partition]], blob.key)
            kept = chosen.get(target)
            if kept is None or blob.documents > kept.documents:
                chosen[target] = blob
            if kept is not None:
                loser = blob if chosen[target] is kept else kept
                log.warning("rescaling from %s: key %r has states from partitions %s and %s; %s keeps the one of "
                            "%d documents, the one of %d is dropped", where, blob.key, kept.partition, blob.partition,
                            target[0], chosen[target].documents, loser.documents)
    out: dict[str, list[StateBlob]] = {name: [] for name in names}
    for (name, _), blob in sorted(chosen.items()):
        out[name].append(blob)
    return out


def _reader_index(name: str) -> tuple[int, str]:
    match = re.search(r"(\d+)$", name)
    return (int(match.group(1)) if match else -1, name)
