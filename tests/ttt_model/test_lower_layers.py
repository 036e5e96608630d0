"""The learner runs only the adapted layers, from hidden states computed below them: its slow
steps' gradients equal those of a learner that runs the whole forward (float64 and float32 on
random models), and the hidden states a reader hands on are bit for bit those the learner
would compute itself."""

import copy

import pytest
import torch

from actors.window_readers import SlowStepReader
from tests.ttt_model.reference import randomise_ttt_parameters, rel_err, tiny_model
from ttt_model import TTTConfig, TTTSession, enable_ttt
from ttt_model.adapted_state import AdaptedState
from ttt_model.config import SlowConfig
from ttt_model.model.lower_layers import capture_inputs, hidden_below
from ttt_model.model.patch import decoder_of
from ttt_model.slow import SlowLearner
from ttt_model.model.state import FastWeightState

CHUNK = 8


def learner_on(family: str, dtype: torch.dtype, seed: int) -> SlowLearner:
    """Four layers, TTT on 0 and 3 (below and among the adapted), adapters on the top two."""
    model = tiny_model(family, seed=seed, layers=4).to(dtype)
    enable_ttt(model, TTTConfig(layers=[0, 3], chunk_size=CHUNK, eta=0.6))
    randomise_ttt_parameters(model, seed=seed + 1)
    model.requires_grad_(False)
    return SlowLearner(model, SlowConfig(enabled=True, rank=3, alpha=6.0, lr=0.05, layers=[-2, -1],
                                         targets=["q_proj", "o_proj", "down_proj"]))


def read_recording_gradients(learner: SlowLearner, windows, chunk_tokens, split: bool, below=None):
    """The nll and every slow step's gradients of one document read by a SlowStepReader."""
    grads = []
    step = learner._step
    learner._step = lambda state, g: (grads.append([t.clone() for t in g]), step(state, g))
    try:
        slow = learner.new_state()
        gen = torch.Generator().manual_seed(1)
        for adapter in slow.adapters.values():  # B != 0: A's gradients are not zero either
            adapter.B = (torch.randn(adapter.B.shape, generator=gen) * 0.2).to(adapter.B.dtype)
        state = AdaptedState(FastWeightState.for_model(learner.model), slow)
        nll = SlowStepReader(learner.model, learner, chunk_tokens, split=split).read(state, windows, below)
    finally:
        learner._step = step
    return nll, grads, state


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-4)], ids=["float64", "float32"])
@pytest.mark.parametrize("chunk_tokens,lengths", [(None, [37]), (2 * CHUNK, [37]), (None, [3 * CHUNK, 29])],
                         ids=["one-step-a-window", "steps-of-16-tokens", "two-windows"])
def test_slow_steps_from_the_layers_below_have_the_whole_forward_s_gradients(dtype, tolerance, chunk_tokens, lengths):
    learner = learner_on("qwen3", dtype, seed=5)
    assert learner.lowest_layer == 2
    gen = torch.Generator().manual_seed(7)
    windows = [torch.randint(0, 101, (1, n), generator=gen) for n in lengths]
    chunk = chunk_tokens or max(lengths)
    whole_nll, whole_grads, whole_state = read_recording_gradients(learner, windows, chunk, split=False)
    split_nll, split_grads, split_state = read_recording_gradients(learner, windows, chunk, split=True)
    assert len(split_grads) == len(whole_grads) == sum(-(-n // chunk) for n in lengths)
    assert rel_err(split_nll, whole_nll) < tolerance
    for got, want in zip(split_grads, whole_grads):
        assert all(rel_err(g, w) < tolerance for g, w in zip(got, want))
        assert all(w.abs().sum() > 0 for w in want)  # every adapter learns: the check can fail
    for name, adapter in whole_state.slow.adapters.items():
        assert rel_err(split_state.slow.adapters[name].B, adapter.B) < tolerance * 10


def test_a_reader_hands_on_what_the_learner_would_compute_bit_for_bit():
    learner = learner_on("llama", torch.float32, seed=11)
    model = learner.model
    gen = torch.Generator().manual_seed(3)
    windows = [torch.randint(0, 101, (1, n), generator=gen) for n in (3 * CHUNK + 5, 2 * CHUNK)]
    version = learner.new_state()
    for adapter in version.adapters.values():
        adapter.B = torch.randn(adapter.B.shape, generator=gen) * 0.1
    # A reader of a version: every layer, the version bound, fast weights carried across windows.
    session = TTTSession(model, FastWeightState.for_model(model))
    with learner.bound(version), capture_inputs(model, learner.lowest_layer) as handed:
        for window in windows:
            session.read_window(window)
    assert len(handed) == len(windows)
    computed = hidden_below(model, windows, learner.lowest_layer, FastWeightState.for_model(model))
    assert all(torch.equal(h, c) for h, c in zip(handed, computed))
    # ... and the learner reading from them learns exactly what it learns computing them itself.
    _, from_handed, _ = read_recording_gradients(learner, windows, 64, split=True, below=handed)
    _, from_itself, _ = read_recording_gradients(learner, windows, 64, split=True)
    assert all(torch.equal(a, b) for got, want in zip(from_handed, from_itself) for a, b in zip(got, want))
    assert len(decoder_of(model).layers) == 4 and not any(type(m).__name__ == "KnownHidden" for m in model.modules())


def test_handed_states_of_another_shape_are_not_used():
    learner = learner_on("qwen3", torch.float32, seed=2)
    windows = [torch.randint(0, 101, (1, 20))]
    wrong = [torch.zeros(1, 19, 32)]
    reader = SlowStepReader(learner.model, learner, 64, split=True)
    state = AdaptedState(FastWeightState.for_model(learner.model), learner.new_state())
    nll = reader.read(state, windows, wrong)
    assert reader.handed == 0 and torch.isfinite(nll).all()
    copy.deepcopy(state)  # the state holds no graph
