"""DocumentReader with the shipped model, without Ray: prequential loss, scopes, oversize."""

from pathlib import Path

import pytest
import torch

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from actors.reading_modes import sampled
from ttt_model import TTTSession
from ttt_model.model.patch import static_mode
from tests.sample_text import SAMPLE_TEXT
from pipeline.processing.actor_specs import standalone_reader_spec
from tests.conftest import TINY_MODEL

MODEL = str(TINY_MODEL)
TEXT = SAMPLE_TEXT[:6000]


def reader(tmp_path, **overrides) -> DocumentReader:
    spec = standalone_reader_spec(model_path=MODEL, device="cpu", spill_dir=str(tmp_path), **overrides)
    return DocumentReader(spec, name="w0")


def test_loss_is_the_prequential_loss_and_base_loss_is_the_static_model(tmp_path):
    w = reader(tmp_path, scope="per_document", base_loss_sample_rate=1.0)
    out = w.process(DocumentTask("d1", TEXT))
    ids = torch.tensor(w.tokenizer(TEXT, add_special_tokens=False)["input_ids"])[None]
    assert out.ok and out.tokens == ids.shape[1] > 1024  # longer than the model's chunk of 512
    want = TTTSession(w.model).feed(ids).nll[0, 1:].double().mean().item()
    assert out.loss == pytest.approx(want, rel=1e-6)
    with static_mode(w.model), torch.no_grad():
        logits = w.model(ids).logits[0, :-1]
    base = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    assert out.base_loss == pytest.approx(base, rel=1e-5)
    assert out.loss != pytest.approx(out.base_loss, rel=1e-4)  # the fast weights did change the output


def test_per_document_scope_forgets_and_global_scope_learns(tmp_path):
    per_doc = reader(tmp_path, scope="per_document")
    first, again = per_doc.process(DocumentTask("a", TEXT)), per_doc.process(DocumentTask("b", TEXT))
    assert first.loss == again.loss and again.state_documents == 2
    shared = reader(tmp_path, scope="global")
    first, again = shared.process(DocumentTask("a", TEXT)), shared.process(DocumentTask("b", TEXT))
    assert first.loss == pytest.approx(per_doc.process(DocumentTask("c", TEXT)).loss, rel=1e-6)
    assert again.loss != first.loss and again.fast_weight_norm > first.fast_weight_norm > 0
    assert (first.state_documents, again.state_documents) == (1, 2)


def test_per_key_scope_keeps_one_state_per_key(tmp_path):
    w = reader(tmp_path, scope="per_key", max_keys_in_memory=1)
    a1 = w.process(DocumentTask("1", TEXT, key="a"))
    b1 = w.process(DocumentTask("2", TEXT, key="b"))  # spills "a"
    a2 = w.process(DocumentTask("3", TEXT, key="a"))  # reloads "a"
    assert a1.loss == b1.loss  # both keys start from zero
    assert (a2.state_key, a2.state_documents) == ("a", 2) and a2.loss != a1.loss
    assert w.mode.states.spills == 2 and w.mode.states.reloads == 1


def test_oversize_documents_are_rejected_or_read_in_windows(tmp_path):
    rejected = reader(tmp_path, max_document_tokens=300, oversize="reject").process(DocumentTask("x", TEXT))
    assert not rejected.ok and rejected.reason.startswith("oversize:") and rejected.tokens > 300
    split = reader(tmp_path, max_document_tokens=300, oversize="split").process(DocumentTask("x", TEXT))
    assert split.ok and split.windows == -(-split.tokens // 300)


def test_base_loss_sampling_is_the_drivers_choice_else_a_stable_function_of_the_id():
    tasks = [DocumentTask(f"doc-{i}", "x") for i in range(2000)]
    picked = [t.id for t in tasks if sampled(t, 0.25)]
    assert 400 < len(picked) < 600
    assert picked == [t.id for t in tasks if sampled(t, 0.25)]
    assert not any(sampled(t, 0.0) for t in tasks) and all(sampled(t, 1.0) for t in tasks)
    # A stream's driver decides by a keyed hash of the position: the id no longer matters.
    assert sampled(DocumentTask(picked[0], "x", shadow=False), 0.25) is False
    assert sampled(DocumentTask("never-picked", "x", shadow=True), 0.0) is True


def test_a_new_key_starts_from_the_slow_weights_of_the_nearest_key(tmp_path):
    code = (Path(__file__).parents[2] / "ttt_model" / "slow" / "learner.py").read_text()[:4000]
    slow = {"enabled": True, "lr": 3e-3, "reuse_nearest_key": True}
    w = reader(tmp_path / "a", scope="per_key", max_keys_in_memory=1, slow=slow)
    first = [w.process(DocumentTask(i, text, key=key)) for i, text, key in
             (("1", TEXT[:3000], "prose"), ("2", code, "code"), ("3", TEXT[3000:], "prose"))]
    assert [o.reused_from for o in first] == [None, "prose", None]  # "code" had one candidate only
    assert w.mode.states.spills >= 2 and set(w.mode.states.signatures()) == {"prose", "code"}
    before = w.snapshot()

    # A new key whose first document is prose starts where "prose" is: it reads that document
    # exactly as the key "prose" itself would.
    new = w.process(DocumentTask("4", TEXT[1000:4000], key="prose-2"))
    assert new.reused_from == "prose" and new.state_documents == 1
    same = reader(tmp_path / "b", scope="per_key", slow=slow)
    same.restore(before)
    assert set(same.mode.states.signatures()) == {"prose", "code"}  # checkpointed with the states
    assert same.process(DocumentTask("4", TEXT[1000:4000], key="prose")).loss == new.loss
    # With a similarity bar no key reaches, it starts from the base model as before.
    strict = reader(tmp_path / "c", scope="per_key", slow={**slow, "reuse_min_similarity": 1.0})
    strict.restore(before)
    alone = strict.process(DocumentTask("4", TEXT[1000:4000], key="prose-2"))
    base = reader(tmp_path / "d", scope="per_key", slow={**slow, "reuse_nearest_key": False})
    assert alone.reused_from is None and alone.loss == base.process(DocumentTask("4", TEXT[1000:4000], key="x")).loss
    assert alone.loss > new.loss


def test_a_document_tokenized_ahead_in_another_thread_reads_the_same(tmp_path):
    import threading

    plain, ahead = reader(tmp_path / "a", scope="global"), reader(tmp_path / "b", scope="global", tokenize_ahead=True)
    assert not plain.tokenizes_ahead  # by default on a GPU only
    texts = [TEXT[:3000], TEXT[3000:], TEXT[1000:4000]]
    for i, text in enumerate(texts):
        prepared = threading.Thread(target=ahead.prepare, args=(DocumentTask(f"d{i}", text),))
        prepared.start()
        prepared.join()
        want, got = plain.process(DocumentTask(f"d{i}", text)), ahead.process(DocumentTask(f"d{i}", text))
        assert (got.tokens, got.loss, got.fast_weight_norm) == (want.tokens, want.loss, want.fast_weight_norm)
    assert not ahead._prepared  # each prepared document was taken by its process call
    # Prepared under an id, then sent with other text under that id: the text sent is read.
    ahead.prepare(DocumentTask("x", TEXT[:500]))
    assert "x" in ahead._prepared
    assert ahead.process(DocumentTask("x", TEXT[:2000])).tokens == plain.process(DocumentTask("x", TEXT[:2000])).tokens


def test_a_batch_of_documents_reads_as_one_at_a_time(tmp_path):
    """per_document scope: several documents of different lengths (one of them over a chunk
    border, one shorter than a chunk, one too short to score) in padded forwards give each
    document the outcome of reading it alone."""
    texts = [TEXT[:2500], TEXT[2500:3100], TEXT[3000:3004], TEXT[4000:5200], TEXT * 2, TEXT[100:4600]]
    tasks = [DocumentTask(f"d{i}", text) for i, text in enumerate(texts)]
    alone = reader(tmp_path / "a", scope="per_document", base_loss_sample_rate=0.5, max_document_tokens=2048)
    want = [alone.process(t) for t in tasks]
    batched = reader(tmp_path / "b", scope="per_document", base_loss_sample_rate=0.5, batch_tokens=4096,
                     max_document_tokens=2048)  # TEXT * 2 is read in windows, alone
    got = batched.process_batch(tasks)
    # The first four in one forward (batch_tokens), then TEXT * 2 (over max_document_tokens) and
    # the last one alone
    assert batched.mode.batches == 1 and batched.mode.batched_documents == 4
    assert sum(w.tokens for w in want) > 2000 and any(w.tokens > 512 for w in want)
    assert any(w.base_loss is not None for w in want) and any(w.base_loss is None for w in want)
    for w, g in zip(want, got):
        assert (g.id, g.ok, g.tokens, g.state_documents, g.windows) == (w.id, w.ok, w.tokens, w.state_documents, w.windows)
        assert g.loss == pytest.approx(w.loss, rel=1e-5, abs=1e-6) if w.loss is not None else g.loss is None
        assert (g.base_loss is None) == (w.base_loss is None)
        if w.base_loss is not None:
            assert g.base_loss == pytest.approx(w.base_loss, rel=1e-5)
        assert g.fast_weight_norm == pytest.approx(w.fast_weight_norm, rel=1e-4, abs=1e-6)
        assert g.delta_ratio == pytest.approx(w.delta_ratio, rel=1e-4, abs=1e-7)
    assert batched.stats()["documents"] == alone.stats()["documents"] == len(tasks)
    # The scope's state is the last document's, as after reading them one at a time.
    # (get() would reset a per_document state: read it as the store holds it)
    for (_, a), (_, b) in zip(alone.mode.states._live["__global__"].state.fast, batched.mode.states._live["__global__"].state.fast):
        assert a.delta.abs().sum() > 0
        torch.testing.assert_close(b.delta, a.delta, rtol=1e-4, atol=1e-7)


def test_a_batch_of_keyed_documents_reads_as_one_at_a_time(tmp_path):
    """per_key scope: documents of distinct keys share a forward, each row starting from its key's
    fast weights; a key's next document waits for the next batch. Outcomes and every key's state
    (delta and counters) equal reading them one at a time."""
    spans = [(0, 2500), (2500, 3100), (100, 4600), (4000, 5200), (1000, 2300), (3000, 5600)]
    keys = ["a", "b", "a", "c", "b", "a"]
    tasks = [DocumentTask(f"d{i}", TEXT[lo:hi], key=k) for i, ((lo, hi), k) in enumerate(zip(spans, keys))]
    alone = reader(tmp_path / "a", scope="per_key")
    want = [alone.process(t) for t in tasks]
    batched = reader(tmp_path / "b", scope="per_key", batch_tokens=8192)
    got = batched.process_batch(tasks)
    # [a, b], then a's second document: [a, c, b], then [a] alone
    assert (batched.mode.batches, batched.mode.batched_documents) == (2, 5)
    for w, g in zip(want, got):
        assert (g.id, g.tokens, g.state_key, g.state_documents) == (w.id, w.tokens, w.state_key, w.state_documents)
        assert g.loss == pytest.approx(w.loss, rel=1e-5)
        assert g.fast_weight_norm == pytest.approx(w.fast_weight_norm, rel=1e-4)
    assert want[2].loss != pytest.approx(want[0].loss, rel=1e-3)  # "a" learned from its first document
    for key in "abc":
        for (_, a), (_, b) in zip(alone.mode.states.peek(key).fast, batched.mode.states.peek(key).fast):
            # float32 sums in another order (a batched product): one element in 2e5 was seen 1.3e-7 off
            torch.testing.assert_close(b.delta, a.delta, rtol=1e-4, atol=1e-6)
            assert (b.tokens_seen, b.updates, b.tail_len) == (a.tokens_seen, a.updates, a.tail_len)
