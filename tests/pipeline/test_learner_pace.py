"""The processor says when the learner is behind its readers, with the ``every`` that keeps up."""

import pytest

from pipeline.processing.learner_pace import learner_pace


def readers(*seconds_per_document, documents=20):
    return [{"documents": documents, "busy_s": documents * s, "alive": True} for s in seconds_per_document]


def test_a_learner_slower_than_its_readers_is_behind_and_names_the_every_that_keeps_up():
    # Two readers at 0.5 s a document: 4 documents/s. The learner: 0.9 s a document, 1.11/s.
    pace = learner_pace(readers(0.5, 0.5), {"position": 40, "learn_s": 36.0, "every": 1})
    assert pace.behind and pace.readers_documents_per_s == pytest.approx(4.0)
    assert pace.learner_documents_per_s == pytest.approx(40 / 36)
    assert pace.every_to_keep_up == 4  # 0.9 s / 4 = 0.225 s a document of the stream: within 0.25 s
    # Learning one in 4 it takes in 4.44 documents/s (its time scales with what it learns): it keeps up.
    assert not learner_pace(readers(0.5, 0.5), {"position": 40, "learn_s": 9.0, "every": 4}).behind


def test_a_learner_as_fast_as_its_reader_keeps_up_and_too_little_measured_says_nothing():
    pace = learner_pace(readers(1.0), {"position": 30, "learn_s": 25.0, "every": 1})
    assert not pace.behind and pace.every_to_keep_up == 1
    assert learner_pace(readers(1.0, documents=3), {"position": 30, "learn_s": 25.0}) is None
    assert learner_pace(readers(1.0), {"position": 2, "learn_s": 1.0}) is None
    dead = [{"documents": 50, "busy_s": 5.0, "alive": False}]  # a dead reader's figures are not a rate
    assert learner_pace(dead, {"position": 30, "learn_s": 25.0}) is None
