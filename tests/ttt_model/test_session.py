"""Streaming in pieces equals the parallel forward; the state equals the reference's."""

import random

import pytest
import torch

from tests.ttt_model.reference import randomise_ttt_parameters, reference_ttt_mlp, rel_err, tiny_model
from ttt_model import FastWeightState, TTTConfig, TTTSession, enable_ttt, ttt_forward
from ttt_model.model.state import ttt_layers


def random_pieces(total: int, rng: random.Random) -> list[int]:
    sizes = []
    while total > 0:
        n = min(total, rng.choice([1, 2, 3, 5, 7, 8, 9, 16, 21]))
        sizes.append(n)
        total -= n
    return sizes


def stream(session: TTTSession, ids: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logits, nll, pos = [], [], 0
    for n in sizes:
        out = session.feed(ids[:, pos : pos + n])
        logits.append(out.logits)
        nll.append(out.nll)
        pos += n
    return torch.cat(logits, 1), torch.cat(nll, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_in_random_pieces_equals_parallel_forward(family, seed):
    rng = random.Random(seed)
    model = tiny_model(family, seed=seed)
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=8, eta=0.6))
    randomise_ttt_parameters(model, seed=seed + 10)
    ids = torch.randint(0, 101, (2, rng.choice([61, 64, 70])))
    with torch.no_grad():
        parallel = model(ids).logits
    logits, nll = stream(TTTSession(model, batch_size=2), ids, random_pieces(ids.shape[1], rng))
    assert rel_err(logits, parallel) < 1e-5
    want_nll = -torch.log_softmax(parallel[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.isnan(nll[:, 0]).all()
    assert rel_err(nll[:, 1:], want_nll) < 1e-5


def test_streamed_state_equals_reference_fast_weights():
    model = tiny_model("qwen3", seed=2, layers=1)
    enable_ttt(model, TTTConfig(layers=[0], chunk_size=6, eta=0.9))
    randomise_ttt_parameters(model, seed=3)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 27, 32)
    state = FastWeightState.for_model(model)
    with torch.no_grad(), ttt_forward(state=state):
        mlp(x[:, :10])
        mlp(x[:, 10:])
    _, want_delta = reference_ttt_mlp(
        x[0], x[0], mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
        mlp.ttt_conv.weight[:, 0], mlp.ttt_proj.weight, 0.9, 6, mlp.act_fn,
    )
    layer = state.layers[0]
    assert rel_err(layer.delta[0], want_delta) < 1e-5
    assert layer.tail_len == 27 % 6 and layer.updates == 4 and layer.tokens_seen == 27


@pytest.mark.parametrize("objective", ["in_place", "gradient"])
def test_end_document_learns_the_unfinished_chunk(objective):
    model = tiny_model("qwen3", seed=6, layers=2)
    enable_ttt(model, TTTConfig(layers=[1], chunk_size=8, eta=0.7, objective=objective, gradient_lr=0.1))
    randomise_ttt_parameters(model, seed=7)
    session = TTTSession(model)
    session.feed(torch.randint(0, 101, (1, 13)))  # one whole chunk + 5 tokens
    before = session.state.clone()
    session.end_document()
    layer = session.state.layers[1]
    assert layer.tail_len == 0 and session.cache.get_seq_length() == 0 and session.last_logits is None
    assert rel_err(layer.delta, before.layers[1].delta) > 1e-3  # the 5-token tail changed the weights
    session.end_document()  # nothing left to learn: a second close changes nothing
    assert torch.equal(session.state.layers[1].delta, layer.delta)


def test_flushed_tail_equals_reference():
    model = tiny_model("qwen3", seed=8, layers=1)
    enable_ttt(model, TTTConfig(layers=[0], chunk_size=6, eta=0.9))
    randomise_ttt_parameters(model, seed=9)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 16, 32)
    state = FastWeightState.for_model(model)
    with torch.no_grad(), ttt_forward(state=state):
        mlp(x)
    mlp.flush_tail(state.layers[0])
    _, want_delta = reference_ttt_mlp(
        x[0], x[0], mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
        mlp.ttt_conv.weight[:, 0], mlp.ttt_proj.weight, 0.9, 6, mlp.act_fn, flush_tail=True,
    )
    assert rel_err(state.layers[0].delta[0], want_delta) < 1e-5
    assert state.layers[0].updates == 3 and state.layers[0].tail_len == 0


def test_state_carries_over_documents_and_reset_returns_to_base():
    model = tiny_model("llama", seed=4)
    enable_ttt(model, TTTConfig(layers=[1], chunk_size=4, eta=0.5))
    randomise_ttt_parameters(model, seed=5)
    session = TTTSession(model)
    doc = torch.randint(0, 101, (1, 16))
    first = session.feed(doc).logits
    session.reset(keep_state=True)
    adapted = session.feed(doc).logits
    assert rel_err(adapted, first) > 1e-4  # the second reading starts from learned fast weights
    session.reset()
    assert torch.equal(session.feed(doc).logits, first)


def test_safeguards_bound_the_fast_weights():
    model = tiny_model("qwen3", seed=6)
    cfg = TTTConfig(layers=[0, 2], chunk_size=4, eta=5.0, max_update_norm=0.05, max_delta_ratio=0.01)
    enable_ttt(model, cfg)
    randomise_ttt_parameters(model, seed=7, scale=1.0)
    session = TTTSession(model)
    session.feed(torch.randint(0, 101, (1, 40)))
    for idx, ratio in session.state.delta_ratios(model).items():
        assert ratio.item() <= 0.01 + 1e-6
        assert ratio.item() > 0.005  # the cap, not a lack of learning, is what bounds it


def test_decay_forgets_old_updates():
    def final_norm(decay):
        model = tiny_model("qwen3", seed=8)
        enable_ttt(model, TTTConfig(layers=[0], chunk_size=4, decay=decay))
        randomise_ttt_parameters(model, seed=9)
        session = TTTSession(model)
        session.feed(torch.randint(0, 101, (1, 64), generator=torch.Generator().manual_seed(1)))
        return session.state.norms()[0].item()

    assert final_norm(0.5) < final_norm(None)


def test_state_maintenance_operations():
    model = tiny_model("qwen3", seed=10)
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=4))
    randomise_ttt_parameters(model)
    session = TTTSession(model)
    session.feed(torch.randint(0, 101, (1, 18)))
    state = session.state
    norms = state.norms()
    assert all(n.item() > 0 for n in norms.values())
    state.clip_(0.5 * min(n.item() for n in norms.values()))
    assert all(abs(n.item() - 0.5 * min(x.item() for x in norms.values())) < 1e-5 for n in state.norms().values())
    before = {i: n.item() for i, n in state.norms().items()}
    state.decay_(0.25)
    assert all(abs(state.norms()[i].item() - 0.25 * before[i]) < 1e-6 for i in before)
    state.reset()
    assert all(n.item() == 0 for n in state.norms().values()) and state.layers[0].tail_len == 0


def test_merge_into_folds_the_state_into_w_down():
    model = tiny_model("mistral", seed=11)
    enable_ttt(model, TTTConfig(layers=[0, 1], chunk_size=4))
    randomise_ttt_parameters(model, seed=12)
    session = TTTSession(model)
    session.feed(torch.randint(0, 101, (1, 16)))
    state = session.state
    probe = torch.randint(0, 101, (1, 3))  # shorter than a chunk: no further updates
    probe_session = TTTSession(model, state=state.clone())
    with torch.no_grad():
        adapted = probe_session.feed(probe).logits
    from ttt_model import disable_ttt

    state.merge_into(model)
    disable_ttt(model)
    assert not any(".ttt_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        merged = model(probe).logits
    assert rel_err(merged, adapted) < 1e-5


def test_sessions_on_one_model_run_concurrently_in_threads():
    """The per-call inputs (the state streamed) travel with the call, not on the model: two
    sessions fed at the same time from two threads read as if each were alone."""
    import threading

    from ttt_model.model.forward_call import current_call

    model = tiny_model("qwen3", seed=5)
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=4, eta=0.9))
    randomise_ttt_parameters(model, seed=6)
    gen = torch.Generator().manual_seed(7)
    docs = [torch.randint(0, 101, (1, 37), generator=gen) for _ in range(2)]
    want = [TTTSession(model, FastWeightState.for_model(model)).feed(d).logits for d in docs]

    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def read(i: int) -> None:
        for _ in range(3):
            session = TTTSession(model, FastWeightState.for_model(model))
            barrier.wait()
            got[i].append(torch.cat([session.feed(piece).logits for piece in docs[i].split(5, dim=1)], dim=1))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(got[i]) == 3
        for logits in got[i]:
            assert rel_err(logits, want[i]) < 1e-5
    assert current_call().state is None  # nothing is left behind


def test_read_window_is_a_fresh_context_fed_whole():
    model = tiny_model("qwen3", seed=8)
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=4, eta=0.9))
    randomise_ttt_parameters(model, seed=9)
    ids = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(10))
    fed, read = TTTSession(model), TTTSession(model)
    for window in (ids[:, :13], ids[:, 13:]):
        fed.reset(keep_state=True)
        want = fed.feed(window)
        got = read.read_window(window)
        torch.testing.assert_close(got.logits, want.logits)
        torch.testing.assert_close(got.nll, want.nll, equal_nan=True)
    for (_, a), (_, b) in zip(fed.state, read.state):
        torch.testing.assert_close(a.delta, b.delta)
        torch.testing.assert_close(a.tail_h, b.tail_h)
