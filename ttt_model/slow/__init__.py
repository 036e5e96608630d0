"""Slow weights: low-rank adapters that a stream trains online, from one document to the next
(``learner``), their state and published versions (``state``), and the head's loss in one pass
(``head_loss``)."""

from ttt_model.slow.learner import SlowLearner, rehearsal_chunks
from ttt_model.slow.state import AdapterTensors, SlowState, SlowVersion

__all__ = ["AdapterTensors", "SlowLearner", "SlowState", "SlowVersion", "rehearsal_chunks"]
