"""Slow weights: the adapters equal dense merged weights, one step equals AdamW on a dense float64
reference, reading is prequential, the bounds hold, and a saved state continues bit for bit."""

import copy

import pytest
import torch
from torch.func import functional_call

from tests.ttt_model.reference import randomise_ttt_parameters, reference_logits, rel_err, tiny_model
from ttt_model import TTTConfig, TTTSession, enable_ttt, ttt_forward
from ttt_model.adapted_state import AdaptedState
from ttt_model.model.objectives import next_token_loss
from ttt_model.config import SlowConfig
from ttt_model.slow import SlowLearner
from ttt_model.model.state import FastWeightState

CHUNK = 8


def ttt_model(seed: int = 0) -> torch.nn.Module:
    model = tiny_model("qwen3", seed=seed).double()
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=CHUNK, eta=0.6))
    randomise_ttt_parameters(model, seed=seed + 10)
    return model.requires_grad_(False)


def random_adapters(learner: SlowLearner, state, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for adapter in state.adapters.values():
        adapter.A = torch.randn(adapter.A.shape, generator=gen, dtype=torch.float64) * 0.3
        adapter.B = torch.randn(adapter.B.shape, generator=gen, dtype=torch.float64) * 0.3


def dense_weights(learner: SlowLearner, state) -> dict[str, torch.Tensor]:
    """W_0 + scale B A per adapted module, computed apart from the parametrization."""
    return {f"{name}.weight": learner.base_weight(name) + learner.config.scale * (a.B @ a.A)
            for name, a in state.adapters.items()}


def fresh(model) -> torch.nn.Module:
    """A copy of the model before any slow weights were attached (no parametrizations)."""
    return copy.deepcopy(model)


def test_bound_slow_weights_equal_the_dense_merged_model_in_float64():
    model = ttt_model()
    plain = fresh(model)
    learner = SlowLearner(model, SlowConfig(enabled=True, rank=3, alpha=5.0, targets=["q_proj", "v_proj", "o_proj", "down_proj"]))
    state = learner.new_state()
    random_adapters(learner, state, seed=1)
    ids = torch.randint(0, 101, (1, 29))
    merged = fresh(plain)
    with torch.no_grad():
        for name, weight in dense_weights(learner, state).items():
            merged.get_submodule(name.removesuffix(".weight")).weight.copy_(weight)
    with learner.bound(state), torch.no_grad():
        adapted = model(ids).logits
    assert rel_err(adapted, reference_logits(merged, ids)) < 1e-10
    with learner.bound(None), torch.no_grad():  # unbound: the base model
        assert rel_err(model(ids).logits, reference_logits(plain, ids)) < 1e-10


@pytest.mark.parametrize("l2_to_base,max_grad_norm,length", [(0.0, None, CHUNK), (0.5, 0.01, CHUNK), (0.5, 0.01, 3 * CHUNK + 2)])
def test_one_slow_step_equals_adamw_on_a_dense_reference(l2_to_base, max_grad_norm, length):
    model = ttt_model(seed=3)
    plain = fresh(model)
    config = SlowConfig(enabled=True, rank=2, alpha=4.0, lr=0.05, l2_to_base=l2_to_base, max_grad_norm=max_grad_norm)
    learner = SlowLearner(model, config)
    state = learner.new_state()
    random_adapters(learner, state, seed=4)
    ids = torch.randint(0, 101, (1, length))

    # Reference: the adapters as plain leaves, the weights merged densely, the loss through the
    # whole model's logits in float64, torch's AdamW. The fast weights' updates are constants
    # of the step (frozen_updates), as the slow step takes them; a piece of several TTT chunks
    # is served by them.
    leaves = {name: (a.A.clone().requires_grad_(True), a.B.clone().requires_grad_(True))
              for name, a in state.adapters.items()}
    weights = {f"{n}.weight": learner.base_weight(n) + config.scale * (B @ A) for n, (A, B) in leaves.items()}
    with ttt_forward(state=FastWeightState.for_model(plain), frozen_updates=True):
        logits = functional_call(plain, weights, (ids,)).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    params = [t for pair in leaves.values() for t in pair]
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=l2_to_base, eps=1e-8)
    optimizer.step()

    nll = learner.read(TTTSession(model), ids, state, length)
    assert torch.isnan(nll[0, 0]) and nll.shape == ids.shape
    # Adam divides by sqrt(v): entries whose gradient is near 1e-8 carry float64 round-off of
    # the two summation orders into the step, hence 1e-7 rather than 1e-10.
    for name, (A, B) in leaves.items():
        assert rel_err(state.adapters[name].A, A) < 1e-7
        assert rel_err(state.adapters[name].B, B) < 1e-7
    assert state.steps == 1 and state.tokens == length


def test_reading_is_prequential_and_learns_across_documents():
    model = ttt_model(seed=5)
    learner = SlowLearner(model, SlowConfig(enabled=True, rank=4, lr=0.02, l2_to_base=0.0))
    ids = torch.randint(0, 101, (1, 4 * CHUNK))
    base = TTTSession(model).feed(ids).nll  # no slow weights yet: the model as it is

    state = learner.new_state()
    first = learner.read(TTTSession(model), ids, state, CHUNK)
    # The first chunk is scored before any step; later chunks by weights that learned from the
    # earlier ones only: changing the last chunk's tokens changes no earlier score.
    assert rel_err(first[:, 1:CHUNK], base[:, 1:CHUNK]) < 1e-12
    assert not torch.allclose(first[:, CHUNK:], base[:, CHUNK:])
    changed = ids.clone()
    changed[0, -CHUNK:] = (changed[0, -CHUNK:] + 7) % 101
    other = learner.read(TTTSession(model), changed, learner.new_state(), CHUNK)
    assert torch.equal(other[:, 1 : 3 * CHUNK], first[:, 1 : 3 * CHUNK])
    # A second document (a new session, fresh fast weights) starts from what the first taught.
    again = learner.read(TTTSession(model), ids, state, CHUNK)
    assert again[:, 1:].mean() < first[:, 1:].mean()
    assert state.steps == 8


def test_cap_bounds_every_adapted_matrix_and_l2_pulls_towards_the_base():
    model = ttt_model(seed=6)
    ids = torch.randint(0, 101, (1, 6 * CHUNK))
    capped = SlowLearner(model, SlowConfig(enabled=True, lr=0.5, max_delta_ratio=0.01))
    state = capped.new_state()
    capped.read(TTTSession(model), ids, state, CHUNK)
    norms = {n: torch.linalg.matrix_norm(capped.base_weight(n).float()) for n in capped.modules}
    ratios = state.delta_ratios(norms, capped.config.scale)
    assert max(ratios.values()) <= 0.01 * (1 + 1e-6) and max(ratios.values()) > 0.005

    free = SlowLearner(ttt_model(seed=6), SlowConfig(enabled=True, lr=0.05, l2_to_base=0.0))
    pulled = SlowLearner(ttt_model(seed=6), SlowConfig(enabled=True, lr=0.05, l2_to_base=5.0))
    states = {}
    for name, learner in (("free", free), ("pulled", pulled)):
        states[name] = learner.new_state()
        learner.read(TTTSession(learner.model), ids, states[name], CHUNK)
    assert pulled.delta_ratio(states["pulled"]) < free.delta_ratio(states["free"])


def test_saved_state_continues_bit_for_bit_with_replay():
    model = ttt_model(seed=7)
    learner = SlowLearner(model, SlowConfig(enabled=True, lr=0.01, replay_chunks=2, max_delta_ratio=0.5))
    docs = [torch.randint(0, 101, (1, n)) for n in (3 * CHUNK, 2 * CHUNK + 3, 4 * CHUNK)]

    def new_state():
        return AdaptedState(FastWeightState.for_model(model), learner.new_state())

    def read(state, ids):
        nll = learner.read(TTTSession(model, state.fast), ids, state.slow, CHUNK)
        state.fast.reset()
        return nll

    straight = new_state()
    read(straight, docs[0])
    saved = straight.to_bytes()
    assert straight.slow.replay.shape == (2, CHUNK)  # three full chunks seen, two kept
    want = [read(straight, d) for d in docs[1:]]

    from safetensors.torch import load

    resumed = new_state()
    resumed.load_state_dict(load(saved))
    got = [read(resumed, d) for d in docs[1:]]
    assert all(torch.equal(a[:, 1:], b[:, 1:]) for a, b in zip(want, got, strict=True))
    assert resumed.to_bytes() == straight.to_bytes()


def test_states_and_configs_refuse_what_does_not_fit():
    with pytest.raises(ValueError, match=r"rank\n  Input should be greater than or equal to 1"):
        SlowConfig(rank=0)
    with pytest.raises(ValueError, match=r"rnak\n  Extra inputs are not permitted"):
        SlowConfig.model_validate({"rnak": 4})
    with pytest.raises(ValueError, match="no linear module"):
        SlowLearner(ttt_model(), SlowConfig(targets=["nope_proj"]))
    model = ttt_model()
    with_slow = AdaptedState(FastWeightState.for_model(model), SlowLearner(model, SlowConfig(rank=2)).new_state())
    without = AdaptedState(FastWeightState.for_model(fresh(model)))
    from safetensors.torch import load

    with pytest.raises(ValueError, match="slow weights do not match"):
        without.load_state_dict(load(with_slow.to_bytes()))
    other = SlowLearner(ttt_model(), SlowConfig(rank=3)).new_state()
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(with_slow.slow.state_dict())


def test_rehearsal_holds_the_adaptation_to_the_rehearsed_text():
    stream = torch.arange(6 * CHUNK)[None] % 7  # a stream unlike anything else: one short pattern
    rehearsed = torch.randint(50, 101, (3, CHUNK), generator=torch.Generator().manual_seed(1))
    losses = {}
    for every in (None, 1, 2):
        model = ttt_model(seed=8)
        cfg = SlowConfig(enabled=True, lr=0.05, l2_to_base=0.0, rehearsal_every=every or 1)
        learner = SlowLearner(model, cfg, rehearsed if every else None)
        state = learner.new_state()
        learner.read(TTTSession(model), stream, state, CHUNK)
        with learner.bound(state), torch.no_grad():
            losses[every] = float(next_token_loss(model(input_ids=rehearsed).logits, rehearsed))
    with torch.no_grad():
        base = float(next_token_loss(ttt_model(seed=8)(input_ids=rehearsed).logits, rehearsed))
    # Learning the stream alone makes the rehearsed text worse; rehearsing it (every step or
    # every second step) keeps its loss lower.
    assert losses[None] > base
    assert losses[1] < losses[None] and losses[2] < losses[None]


def test_a_rehearsed_chunk_runs_only_the_adapted_layers_and_gives_the_full_forward():
    model = ttt_model(seed=9)
    rehearsed = torch.randint(0, 101, (3, CHUNK + 3), generator=torch.Generator().manual_seed(2))
    learner = SlowLearner(model, SlowConfig(enabled=True, layers=[-1], rank=2), rehearsed)
    assert learner.lowest_layer == 2
    state = learner.new_state()
    random_adapters(learner, state, seed=3)
    from ttt_model.model.patch import decoder_of

    with learner.bound(state), learner._trainable(state, True):
        with ttt_forward(frozen_updates=True):
            full = decoder_of(model)(input_ids=rehearsed[1][None]).last_hidden_state
        want = torch.autograd.grad(full.square().sum(), learner._parameters(state))
        for _ in range(2):  # the first call keeps every chunk's hidden state below the adapters
            kept = learner._extra_hidden(rehearsed[1], 1)
            got = torch.autograd.grad(kept.square().sum(), learner._parameters(state))
            assert rel_err(kept, full) < 1e-12
            assert all(rel_err(g, w) < 1e-12 for g, w in zip(got, want))
    # Kept for all chunks at once, read as a batch (two rows at a time here): each equal to the
    # chunk read alone.
    assert set(learner._rehearsal_inputs) == {0, 1, 2}
    from ttt_model.model.lower_layers import hidden_below_batched

    batched = hidden_below_batched(model, rehearsed, 2, rows=2)
    for i in range(3):
        with ttt_forward(frozen_updates=True), torch.no_grad():
            hidden = decoder_of(model)(input_ids=rehearsed[i][None], output_hidden_states=True).hidden_states[2]
        assert rel_err(batched[i], hidden) < 1e-12 and rel_err(learner._rehearsal_inputs[i], hidden) < 1e-12
    assert len(decoder_of(model).layers) == 3 and not any(type(m).__name__ == "KnownHidden" for m in model.modules())


def test_a_rehearsal_graphs_gradient_is_the_full_forwards_whatever_the_order_of_the_states_adapters():
    """What a rehearsal's CUDA graph holds, run eagerly (its reference on any device): the
    gradient on the adapters of ``scale`` x the rehearsed chunk's summed nll, as autograd through
    the whole model gives it, in float64. The state's tensors are copied into the graph's own in
    the model's order of the adapters, whatever order the state lists them in."""
    from ttt_model.model.patch import decoder_of
    from ttt_model.slow.rehearsal_graph import RehearsalGraph
    from ttt_model.slow.state import SlowState

    model = ttt_model(seed=11)
    rehearsed = torch.randint(0, 101, (3, CHUNK + 3), generator=torch.Generator().manual_seed(4))
    learner = SlowLearner(model, SlowConfig(enabled=True, layers=[-2, -1], rank=2), rehearsed)
    state = learner.new_state()
    random_adapters(learner, state, seed=5)
    reordered = SlowState({name: state.adapters[name] for name in reversed(list(state.adapters))})
    graph = RehearsalGraph(learner, state, learner._rehearsal_hidden, capture=False)
    head = model.get_output_embeddings().weight
    for index, scale in ((2, 0.37), (0, 1.0 / 7)):
        ids = rehearsed[index]
        with learner.bound(state), learner._trainable(state, True):
            with ttt_forward(frozen_updates=True):
                hidden = decoder_of(model)(input_ids=ids[None]).last_hidden_state[0, :-1]
            loss = scale * torch.nn.functional.cross_entropy(hidden @ head.T, ids[1:], reduction="sum")
            want = torch.autograd.grad(loss, learner._parameters(state))
        for listed in (state, reordered):
            got = graph.grads(listed, index, scale)
            assert len(got) == len(want) == 2 * len(learner.deltas)
            assert all(rel_err(g, w) < 1e-10 for g, w in zip(got, want))
    # The graph's binding is undone after each call: the state bound around it is bound again.
    with learner.bound(state):
        graph.grads(state, 1, 0.5)
        assert all(d.A is state.adapters[name].A for name, d in learner.deltas.items())
    assert all(d.A is None for d in learner.deltas.values())


@pytest.mark.parametrize("replay_chunks", [0, 2])
def test_rehearsals_through_their_graphs_static_tensors_learn_what_eager_rehearsals_learn(replay_chunks):
    """A learner whose rehearsals go through ``RehearsalGraph`` (run eagerly here, replayed from a
    CUDA graph on a GPU) and adds their gradient to the stream's learns what one taking both in
    one backward learns, in float64, with a replayed chunk joining the steps or not."""
    stream = torch.randint(0, 101, (1, 6 * CHUNK), generator=torch.Generator().manual_seed(6))
    rehearsed = torch.randint(0, 101, (3, CHUNK + 2), generator=torch.Generator().manual_seed(7))
    states = {}
    for graphed in (False, True):
        model = ttt_model(seed=12)
        cfg = SlowConfig(enabled=True, layers=[-1], lr=0.05, rehearsal_every=2, replay_chunks=replay_chunks)
        learner = SlowLearner(model, cfg, rehearsed)
        assert not learner.graph_rehearsals  # on the CPU: eager, unless asked
        learner.graph_rehearsals = graphed
        state = learner.new_state()
        for _ in range(2):  # a second document: the graph's tensors bound to a state that moved
            learner.read(TTTSession(model), stream, state, CHUNK)
        assert (learner._rehearsal_graph is not None) == graphed
        states[graphed] = state
    assert states[True].steps == states[False].steps == 12
    for name, eager in states[False].adapters.items():
        for part in ("A", "B", "m_A", "m_B", "v_A", "v_B"):
            # The adapters are float32: the two sums of the same gradients round apart.
            assert rel_err(getattr(states[True].adapters[name], part), getattr(eager, part)) < 1e-5
    assert not torch.equal(states[True].adapters[name].B, torch.zeros_like(eager.B))
