"""Whether the learner keeps up with its readers, from the status report's measured times.

With ``processor.learner.every`` 1 the readers read document n with the version learned from
documents up to n - lag: a learner slower than its readers makes them wait. The processor
measures both sides (the seconds each reader spent per document read, the learner's per
document of the stream) and says so, with the ``every`` that would keep up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Documents both sides must have done before their rates say anything.
MIN_DOCUMENTS = 8
# The learner is behind when it takes in fewer documents a second than this share of what the
# readers could read.
KEEPS_UP_SHARE = 0.95


@dataclass(frozen=True)
class LearnerPace:
    readers_documents_per_s: float  # what the readers could read together, reading without a wait
    learner_documents_per_s: float  # documents of the stream the learner takes in (learned or not)
    every: int  # the learner's budget now: one in ``every`` admitted documents learned
    every_to_keep_up: int  # the smallest ``every`` at which it would keep up (its rate scales with it)

    @property
    def behind(self) -> bool:
        return self.learner_documents_per_s < KEEPS_UP_SHARE * self.readers_documents_per_s

    def as_dict(self) -> dict[str, Any]:
        return {"readers_documents_per_s": round(self.readers_documents_per_s, 3),
                "learner_documents_per_s": round(self.learner_documents_per_s, 3),
                "behind": self.behind, "every": self.every, "every_to_keep_up": self.every_to_keep_up}


def learner_pace(readers: list[dict[str, Any]], learner: dict[str, Any]) -> LearnerPace | None:
    """The pace of both sides from the reader and learner stats of a status report, or None
    before enough was measured (or without a learner's stats)."""
    readers = [w for w in readers if w.get("alive", True) and w.get("documents", 0) >= MIN_DOCUMENTS and w.get("busy_s")]
    # Since this run's learner was built or restored: its time is this run's.
    position, learn_s = learner.get("taken_here", learner.get("position", 0)), learner.get("learn_s", 0.0)
    if not readers or position < MIN_DOCUMENTS or learn_s <= 0:
        return None
    reading = sum(w["documents"] / w["busy_s"] for w in readers)
    learning = position / learn_s
    every = int(learner.get("every", 1))
    # Learning time scales with the share of documents learned: 1 / every of them.
    needed = every * reading / (learning * KEEPS_UP_SHARE)
    return LearnerPace(reading, learning, every, max(every, math.ceil(needed - 1e-9)))
