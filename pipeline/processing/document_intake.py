"""DocumentIntake: how a record of the documents topic becomes the document the stream reads,
and which reader reads it.

A record is parsed and bounded (``pipeline.stream_io.messages.parse_document``: what does not
parse is ``Rejected``, with the reason). A document gets its tenant's state name (never its key:
``pipeline.state.tenant_keys``), and draws made by a keyed hash of its position, fixed on a
replay and out of a producer's reach: whether the base model's shadow scores it, and, where a
learner learns, whether it is held out for the promotion gate; then the admission checks say
whether the learner may learn from it (a quarantined key is alerted once). Its reader is the one
that owns its partition.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from pipeline.stream_io.source import ConsumerRecord

from pipeline.config import ProcessorConfig
from pipeline.processing.learning_admission import LearningAdmission
from pipeline.state.tenant_keys import TenantKeys
from pipeline.stream_io.messages import ParsedDocument, Rejected, parse_document
from pipeline.stream_io.sink import KafkaSinks

log = logging.getLogger(__name__)


class DocumentIntake:
    """``assignment``: partition -> the index of the reader that owns it; ``learns``: a learner
    takes the stream's documents (the held-out draw and the admission checks apply)."""

    def __init__(self, config: ProcessorConfig, stream: str, assignment: dict[int, int], keys: TenantKeys,
                 admission: LearningAdmission | None, learns: bool, sinks: KafkaSinks):
        self.config = config
        self.stream = stream
        self.reader_of = dict(assignment)
        self.keys = keys  # names of per-key states
        self.admission = admission  # which documents the learner may learn from (None: all but the held-out)
        self.learns = learns
        self.sinks = sinks

    def take(self, record: ConsumerRecord) -> ParsedDocument | Rejected:
        parsed = parse_document(record.value, record.key, record.topic, record.partition, record.offset,
                                self.config.max_document_bytes)
        if isinstance(parsed, Rejected):
            return parsed
        key = self.keys.state_key(parsed.task.key)
        position = (record.partition, record.offset)
        shadow = self.keys.draw("shadow", *position) < self.config.base_loss_sample_rate
        held_out, kept_out, worth = False, None, None
        if self.learns:
            gate, admission = self.config.learner.gate, self.admission
            held_out = gate.enabled and self.keys.draw("held out", *position) < gate.holdout_fraction
            if admission is not None:
                kept_out = admission.decide(parsed.task.text, key, held_out)
                held_out = held_out and kept_out is None  # no copy or junk in the held-out slice
                worth = admission.novelty
                if admission.newly_quarantined is not None:
                    log.warning("the key of state %s is quarantined: %d of its documents in a row were kept from "
                                "learning", key, self.config.learner.admission.quarantine_after)
                    self.sinks.alert({"type": "quarantined", "stream": self.stream, "state_key": key,
                                      "last_reason": kept_out, "release": "ttt-stream release KEY",
                                      "time": time.time()})
        return replace(parsed, task=replace(parsed.task, key=key, shadow=shadow, held_out=held_out,
                                            kept_out=kept_out, worth=worth))
