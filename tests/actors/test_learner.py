"""The learner and the readers of its versions, with the shipped model, without Ray: readers score
what the synchronous reader scores, versions follow the ledger's order, and a restored learner
goes on bit for bit."""

from dataclasses import replace

import pytest
import torch

from actors.call_types import DocumentTask, ReaderSpec
from actors.document_reader import DocumentReader
from actors.learner import StreamLearner
from actors.call_types import PUBLISHED_KEY
from tests.sample_text import SAMPLE_TEXT
from pipeline.processing.actor_specs import standalone_reader_spec
from tests.conftest import TINY_MODEL

MODEL = str(TINY_MODEL)
DOCS = [DocumentTask(f"d{i}", SAMPLE_TEXT[i * 1500 : (i + 1) * 1500]) for i in range(5)]
# One slow step per document (the documents are shorter than a step), every layer adapted.
SLOW = {"enabled": True, "lr": 3e-3, "chunk_tokens": 1024, "layers": [-2, -1]}


def spec(tmp_path, **overrides) -> ReaderSpec:
    return standalone_reader_spec(model_path=MODEL, device="cpu", spill_dir=str(tmp_path), slow=SLOW, scope="global",
                      deterministic=True, **overrides)


def test_readers_of_lag_1_score_what_the_synchronous_reader_scores(tmp_path):
    synchronous = DocumentReader(spec(tmp_path), name="sync")
    learner = StreamLearner(spec(tmp_path), lag=1)
    reader = DocumentReader(spec(tmp_path, slow_from_learner=True), name="reader")
    base = learner.version(0)
    for n, task in enumerate(DOCS):
        version = learner.version(n)  # trained on documents 0 .. n - 1
        read = reader.process(task, version)
        learner.learn(task)
        want = synchronous.process(task)
        # One step per document: the synchronous reader's weights while it scores document n
        # are those it had after n - 1, which is version n.
        assert read.loss == pytest.approx(want.loss, rel=1e-5)
        assert (read.slow_delta_ratio == 0.0) == (n == 0)  # version 0 is the base model
    assert learner.position == len(DOCS) and learner.version(len(DOCS)).index == len(DOCS)
    later = reader.process(DOCS[0], learner.version(len(DOCS)))
    first = reader.process(DOCS[0], base)
    assert later.loss < first.loss  # the stream taught the slow weights something
    assert reader.snapshot() == []  # nothing outlives a document on a reader


def test_a_learner_fed_by_its_reader_learns_what_it_learns_alone_bit_for_bit(tmp_path):
    """The reader hands on the hidden states below the adapters; the learner runs the layers above."""
    windows = {"max_document_tokens": 4096}  # the long one is read in three
    alone = StreamLearner(spec(tmp_path, **windows), lag=2)
    fed = StreamLearner(spec(tmp_path, **windows), lag=2)
    reader = DocumentReader(spec(tmp_path, slow_from_learner=True, split_at_adapters=True, **windows), name="reader")
    texts = DOCS + [DocumentTask("long", SAMPLE_TEXT[:30000])]
    for n, task in enumerate(texts):
        read = reader.process(task, fed.version(max(0, n - 1)))
        below = reader.take_handed(task.id)
        assert below is not None and sum(b.shape[1] for b in below.windows) == read.tokens and len(below.windows) == read.windows
        assert reader.take_handed(task.id) is None  # taken once
        # Another text's hand-off (its tokens differ), or one computed in another dtype, is not used:
        # the learner computes its own.
        wrong = [below, replace(below, tokens_sha256=previous.tokens_sha256) if n else below,
                 replace(below, dtype="bfloat16")][n % 3]
        previous = below
        assert fed.learn(task, wrong)["loss"] == alone.learn(task)["loss"]
    assert fed.mode.window_reader.handed == 2 and alone.mode.window_reader.handed == 0 and read.windows == 3
    assert [b.data for b in fed.snapshot()] == [b.data for b in alone.snapshot()]


def test_a_fed_learner_takes_the_ids_its_reader_read_only_for_the_text_they_came_from(tmp_path):
    """The hand-off carries the ids read, so the learner does not tokenize the document again; a
    hand-off of another text (the same id, edited) is not taken for it."""
    fed, alone = StreamLearner(spec(tmp_path), lag=2), StreamLearner(spec(tmp_path), lag=2)
    reader = DocumentReader(spec(tmp_path, slow_from_learner=True, split_at_adapters=True), name="reader")
    tokenized = []
    tokenizer = fed.reader.tokenizer
    assert fed.reader.tokenizer_sha256 == reader.tokenizer_sha256  # the same files: the same tokenizer
    fed.reader.tokenizer = lambda text, **kw: tokenized.append(text) or tokenizer(text, **kw)
    for n, task in enumerate(DOCS[:3]):
        reader.process(task, fed.version(max(0, n - 1)))
        below = reader.take_handed(task.id)
        assert below.tokens_for(task.text, fed.reader.tokenizer_sha256) == tokenizer(task.text, add_special_tokens=False)["input_ids"]
        assert below.tokens_for(task.text, "another tokenizer") is None
        edited = replace(task, text=task.text[:-40]) if n == 1 else task
        if n == 1:
            assert below.tokens_for(edited.text, fed.reader.tokenizer_sha256) is None
        if n == 2:  # read by a reader whose tokenizer differs: the learner tokenizes itself
            below = replace(below, tokenizer_sha256="another tokenizer")
        assert fed.learn(edited, below)["loss"] == alone.learn(edited)["loss"]
    assert tokenized == [DOCS[1].text[:-40], DOCS[2].text]  # only those whose hand-off's ids were not taken
    assert fed.mode.window_reader.handed == 2  # the states of the third still were (its tokens are the same)
    assert [b.data for b in fed.snapshot()] == [b.data for b in alone.snapshot()]


def test_versions_are_held_for_the_lag_and_follow_the_order(tmp_path):
    learner = StreamLearner(spec(tmp_path), lag=2)
    learner.learn(DOCS[0])
    learner.learn(DOCS[1])
    assert [v.index for v in learner.published] == [1, 2]
    with pytest.raises(ValueError, match="version 0 is not held"):
        learner.version(0)
    one, two = learner.version(1), learner.version(2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(one.adapters.values(), two.adapters.values()))


def test_versions_that_share_weights_are_saved_and_restored(tmp_path):
    """A document not learned publishes the same weights under the next index (lag 2: both held)."""
    learner = StreamLearner(spec(tmp_path), lag=2)
    learner.learn(DOCS[0])
    learner.learn(replace(DOCS[1], held_out=True))
    one, two = learner.version(1), learner.version(2)
    assert all(a is b for n in one.adapters for a, b in zip(one.adapters[n], two.adapters[n]))
    restored = StreamLearner(spec(tmp_path), lag=2)
    restored.restore(learner.snapshot())
    assert [v.index for v in restored.published] == [1, 2]
    assert all(torch.equal(a, b) for n in two.adapters for a, b in zip(two.adapters[n], restored.version(2).adapters[n]))


def test_a_learner_restored_with_a_larger_lag_serves_the_oldest_version_it_holds(tmp_path):
    """A checkpoint of lag 1 holds one version; read on at lag 2, document n asks for n - 1."""
    one = StreamLearner(spec(tmp_path), lag=1)
    for task in DOCS[:2]:
        one.learn(task)
    two = StreamLearner(spec(tmp_path), lag=2)
    two.restore(one.snapshot())
    assert two.version(1) is two.version(2) and two.version(2).index == 2
    two.learn(DOCS[2])
    with pytest.raises(ValueError, match="version 1 is not held"):  # lag 2 held again: no stand-in
        two.version(1)


def test_a_restored_learner_goes_on_bit_for_bit(tmp_path):
    straight = StreamLearner(spec(tmp_path), lag=2)
    for task in DOCS[:2]:
        straight.learn(task)
    saved = straight.snapshot()
    assert [b.key for b in saved] == ["__global__", PUBLISHED_KEY]
    for task in DOCS[2:]:
        straight.learn(task)

    resumed = StreamLearner(spec(tmp_path), lag=2)
    resumed.restore(saved)
    assert resumed.position == 2 and [v.index for v in resumed.published] == [1, 2]
    for task in DOCS[2:]:
        resumed.learn(task)
    assert [b.data for b in resumed.snapshot()] == [b.data for b in straight.snapshot()]

    resumed.restore([])  # the base model: position 0, version 0 = no adaptation
    assert resumed.position == 0
    assert all(not B.any() for _, B in resumed.version(0).adapters.values())


def test_a_reader_of_versions_needs_one_and_keeps_no_state(tmp_path):
    reader = DocumentReader(spec(tmp_path, slow_from_learner=True), name="reader")
    with pytest.raises(ValueError, match="no version was given"):
        reader.process(DOCS[0])
    learner = StreamLearner(spec(tmp_path), lag=1)
    with pytest.raises(ValueError, match="keeps no state"):
        reader.restore(learner.snapshot())


def test_a_learner_of_every_second_document_keeps_the_order(tmp_path):
    learner = StreamLearner(spec(tmp_path), lag=2, every=2)
    reports = [learner.learn(task) for task in DOCS[:4]]
    assert [r["tokens"] > 0 for r in reports] == [True, False, True, False]
    assert learner.position == 4 and learner.learned == 2
    three, four = learner.version(3), learner.version(4)
    assert all(torch.equal(three.adapters[n][1], four.adapters[n][1]) for n in three.adapters)  # 3 taught nothing
    assert any(B.any() for _, B in four.adapters.values())


def test_a_learner_short_of_time_takes_the_newer_documents_first_and_keeps_to_its_budget(tmp_path):
    import random

    from actors.call_types import DocumentOutcome

    def learner():
        learner = StreamLearner(spec(tmp_path), lag=1, every=3)
        # The choice is what is tested here, not the slow step: reading is stubbed.
        learner.reader.process = lambda task, below=None: DocumentOutcome(task.id, ok=True, tokens=1, loss=1.0)
        return learner

    rng = random.Random(0)
    tasks = [DocumentTask(f"d{i}", "x", worth=float(rng.randint(0, 40))) for i in range(300)]
    first = learner()
    taken = [t.worth for t in tasks if first.learn(t)["tokens"]]
    assert len(tasks) // 3 - 2 <= len(taken) <= len(tasks) // 3 + 2  # one in three, whatever the worths
    mean = sum(t.worth for t in tasks) / len(tasks)
    assert sum(taken) / len(taken) > mean + 4  # and the newer ones (a position-only choice: about the mean)
    # In the ledger's order: a learner restored halfway takes the same ones after.
    second = learner()
    for t in tasks[:150]:
        second.learn(t)
    third = learner()
    third.restore(second.snapshot())
    assert [bool(third.learn(t)["tokens"]) for t in tasks[150:]] == [bool(first_taken) for first_taken in
                                                                  _replay(learner(), tasks)[150:]]


def _replay(learner, tasks):
    return [learner.learn(t)["tokens"] for t in tasks]


def test_a_document_whose_hand_off_is_over_the_cap_is_learned_from_what_the_learner_computes(tmp_path, monkeypatch):
    """Past ``MAX_HANDED_BYTES`` the reader keeps nothing for the learner (no 10x state through
    the object store); the learner computes the layers below itself and learns the same bits."""
    import actors.reading_modes as reading_modes

    small, large = DOCS[0], DocumentTask("large", SAMPLE_TEXT[:20000])
    reader = DocumentReader(spec(tmp_path, slow_from_learner=True, split_at_adapters=True,
                                 max_document_tokens=8192), name="reader")
    hidden_bytes = reader.model.config.hidden_size * next(reader.model.parameters()).element_size()
    small_tokens = reader.process(small, StreamLearner(spec(tmp_path), lag=2).version(0)).tokens
    assert reader.take_handed(small.id) is not None
    monkeypatch.setattr(reading_modes, "MAX_HANDED_BYTES", 2 * small_tokens * hidden_bytes)
    fed, alone = StreamLearner(spec(tmp_path), lag=2), StreamLearner(spec(tmp_path), lag=2)
    for task in (small, large):
        read = reader.process(task, fed.version(0))
        below = reader.take_handed(task.id)
        assert (below is None) == (read.tokens * hidden_bytes > reading_modes.MAX_HANDED_BYTES)
        assert fed.learn(task, below)["loss"] == alone.learn(task)["loss"]
    assert fed.mode.window_reader.handed == 1  # the small one only
    assert [b.data for b in fed.snapshot()] == [b.data for b in alone.snapshot()]
