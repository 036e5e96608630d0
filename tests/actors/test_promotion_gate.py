"""The promotion gate inside the learner, with the shipped model and no Ray: a forced bad step is
rejected and the learner goes back to last-good, bit for bit; a restored learner takes the same
verdict; the gate scores a held-out document as a reader of the same version does."""

from dataclasses import replace

import pytest
import torch

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from actors.learner import StreamLearner
from actors.promotion_gate import PROMOTED, REJECTED, slow_digest
from pipeline.config import GateConfig
from pipeline.processing.actor_specs import standalone_reader_spec
from tests.conftest import TINY_MODEL
from tests.sample_text import SAMPLE_TEXT

MODEL = TINY_MODEL
SLOW = {"enabled": True, "lr": 3e-3, "chunk_tokens": 1024, "layers": [-2, -1],
        "rehearsal_path": str(MODEL / "rehearsal.jsonl"), "rehearsal_tokens": 256}
DOCS = [DocumentTask(f"d{i}", SAMPLE_TEXT[i * 1500 : (i + 1) * 1500]) for i in range(6)]


def spec(tmp_path, **overrides):
    return standalone_reader_spec(model_path=str(MODEL), device="cpu", spill_dir=str(tmp_path), slow=SLOW,
                                  scope="global", deterministic=True, **overrides)


def weights(learner: StreamLearner) -> str:
    return slow_digest(learner.reader.mode.states.get(None).state.slow.state_dict())


def test_a_forced_bad_step_never_passes_and_the_learner_returns_to_last_good(tmp_path):
    learner = StreamLearner(spec(tmp_path), lag=1, gate=GateConfig(max_loss_over_last_good=0.05))
    learner.learn(replace(DOCS[0], held_out=True))
    learner.learn(replace(DOCS[1], held_out=True))
    for task in DOCS[2:5]:
        learner.learn(task)
    first, _ = learner.judge()
    assert first.verdict == PROMOTED and first.heldout_documents == 2 and first.learned == 3
    assert first.gain_vs_base is not None and first.forgetting is not None
    good = weights(learner)
    good_version = learner.version(learner.position)
    # A bad step: the adapters thrown far off, as a diverged update would.
    for adapter in learner.reader.mode.states.get(None).state.slow.adapters.values():
        adapter.B.add_(torch.randn_like(adapter.B, generator=torch.Generator().manual_seed(0)))
    learner.learn(DOCS[5])
    # A stop: the verdict is given (its version does not go live) but not taken; the learner goes on
    # as one that did not stop would.
    bad_weights = weights(learner)
    stopped, _ = learner.judge(settle=False)
    assert stopped.verdict == REJECTED and weights(learner) == bad_weights
    bad, blobs = learner.judge()
    assert bad.verdict == REJECTED and "above last-good" in bad.reason
    assert bad.gain_vs_last_good > 0.05
    # Back at last-good: its weights, optimiser moments and step; the readers' next version too.
    assert weights(learner) == good
    after = learner.version(learner.position)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(after.adapters.values(), good_version.adapters.values()))
    # A learner restored from that version takes the same verdict again: the same state, bit for bit.
    restored = StreamLearner(spec(tmp_path), lag=1, gate=GateConfig(max_loss_over_last_good=0.05))
    restored.restore(blobs)
    assert [b.sha256 for b in restored.snapshot()] == [b.sha256 for b in learner.snapshot()]


def test_the_gate_scores_a_held_out_document_as_a_reader_of_the_version_reads_it(tmp_path):
    learner = StreamLearner(spec(tmp_path), lag=1, gate=GateConfig())
    learner.learn(DOCS[0])
    learner.learn(replace(DOCS[1], held_out=True))
    verdict, _ = learner.judge()
    reader = DocumentReader(spec(tmp_path, slow_from_learner=True), name="reader")
    read = reader.process(DOCS[1], learner.version(learner.position))
    assert verdict.heldout_loss == pytest.approx(read.loss, rel=1e-5)
    base = reader.process(DOCS[1], learner.version(0) if learner.lag > 1 else _base_version(learner))
    assert verdict.base_loss == pytest.approx(base.loss, rel=1e-5)


def _base_version(learner: StreamLearner):
    from ttt_model.slow import SlowVersion

    fresh = learner.mode.new_state().slow
    return SlowVersion(0, {n: (a.A.cpu(), a.B.cpu()) for n, a in fresh.adapters.items()})


def test_held_out_and_kept_out_documents_are_not_learned_and_keep_their_place(tmp_path):
    learner = StreamLearner(spec(tmp_path), lag=1, gate=GateConfig())
    before = weights(learner)
    assert learner.learn(replace(DOCS[0], held_out=True))["reason"] == "held out"
    assert learner.learn(replace(DOCS[1], kept_out="duplicate: the same text"))["reason"].startswith("duplicate")
    assert weights(learner) == before and learner.position == 2 and learner.learned == 0
    learner.learn(DOCS[2])
    verdict, _ = learner.judge()
    assert verdict.kept_out == {"duplicate": 1} and verdict.learned == 1 and verdict.heldout_documents == 1
    assert weights(learner) != before
