"""What the learner spends its time on: one in ``every`` admitted documents, the newer first
(``LearningBudget``), and no slow step on a window whose loss is an outlier (``OutlierWindows``).

Both decide in the ledger's order from what they remember, and what they remember goes into the
learner's snapshot, so that a replay and a restored learner decide the same.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Callable

import torch

from actors.call_types import DocumentTask

# Admitted documents whose worth (actors.call_types.DocumentTask.worth) sets the bar of the next.
WORTH_HISTORY = 32
# The windows learned that an outlier's loss is measured against, and how many before any is one.
OUTLIER_HISTORY, OUTLIER_MIN_HISTORY = 64, 8


class LearningBudget:
    """``every``: learn from one in ``every`` of the documents the learner may learn (neither held
    out nor kept out), for a learner slower than its readers."""

    def __init__(self, every: int):
        self.every = every
        self.worths: deque[float] = deque(maxlen=WORTH_HISTORY)
        self.reset()

    def reset(self) -> None:
        self.admitted = 0  # documents it was asked about: the budget counts them
        self.credit = self.every - 1  # documents' worth of budget saved (in 1 / every)
        self.worths.clear()

    def takes(self, task: DocumentTask) -> bool:
        """Whether the budget is spent on ``task``: a credit of one document per ``every``
        admitted, spent on a document at least as new as the median of the last ones admitted
        (``task.worth``), or on any once two are saved up. In the ledger's order, so a replay
        takes the same ones; without worths, one in ``every``."""
        self.admitted += 1
        if self.every == 1:
            return True
        self.credit = min(self.credit + 1, 2 * self.every)
        worth = task.worth
        enough = worth is None or not self.worths or worth >= statistics.median(self.worths)
        if worth is not None:
            self.worths.append(worth)
        if self.credit >= self.every and (enough or self.credit >= 2 * self.every):
            self.credit -= self.every
            return True
        return False

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"admitted": torch.tensor([self.admitted], dtype=torch.int64),
                "credit": torch.tensor([self.credit], dtype=torch.int64),
                "worths": torch.tensor(list(self.worths), dtype=torch.float64)}

    def load(self, tensors: dict[str, torch.Tensor], position: int) -> None:
        """From a snapshot's tensors (taken out of ``tensors``); one from before the budget
        counted admitted documents counted every one (``position``)."""
        self.admitted = int(tensors.pop("admitted", torch.tensor([position]))[0])
        self.credit = int(tensors.pop("credit", torch.tensor([self.every - 1]))[0])
        self.worths.clear()
        self.worths.extend(tensors.pop("worths", torch.zeros(0, dtype=torch.float64)).tolist())


class OutlierWindows:
    """``admit``: whether a window of this loss takes its slow step: not when its loss is above the
    median of the last windows learned by more than ``margin`` (a document unlike the stream,
    junk the text checks let by). ``kept_out``: told of each window kept out."""

    def __init__(self, margin: float | None, kept_out: Callable[[], None]):
        self.margin = margin
        self.kept_out = kept_out
        self.losses: deque[float] = deque(maxlen=OUTLIER_HISTORY)  # of the windows learned, for the median
        self.outliers = 0

    def admit(self, loss: float) -> bool:
        if len(self.losses) >= OUTLIER_MIN_HISTORY:
            median = statistics.median(self.losses)
            if not math.isfinite(loss) or loss > median * (1 + self.margin):
                self.outliers += 1
                self.kept_out()
                return False
        if math.isfinite(loss):
            self.losses.append(loss)
        return True

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"window_losses": torch.tensor(list(self.losses), dtype=torch.float64)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.losses.clear()
        self.losses.extend(tensors.pop("window_losses", torch.zeros(0, dtype=torch.float64)).tolist())
