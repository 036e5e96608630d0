"""The gradient objective (dynamic evaluation) on fast weights, against plain autograd."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.ttt_model.reference import rel_err, tiny_model
from ttt_model import TTTConfig, TTTSession, enable_ttt


def gradient_model(seed=0, **overrides):
    model = tiny_model("qwen3", seed=seed)
    base = copy.deepcopy(model)
    cfg = dict(layers=[0, 2], chunk_size=8, objective="gradient", gradient_lr=0.05, gradient_steps=1)
    cfg.update(overrides)
    enable_ttt(model, TTTConfig(**cfg))
    return model, base


def test_first_chunk_is_scored_by_the_base_model_and_one_sgd_step_matches_autograd():
    model, base = gradient_model()
    ids = torch.randint(0, 101, (1, 8))
    session = TTTSession(model)
    out = session.feed(ids)
    with torch.no_grad():
        assert rel_err(out.logits, base(ids).logits) < 1e-6  # prequential: scored before learning

    # Reference: the gradient of the chunk's next-token loss w.r.t. each W_down, in float64.
    ref = copy.deepcopy(base).double()
    logits = ref(ids).logits
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    weights = [ref.model.layers[i].mlp.down_proj.weight for i in (0, 2)]
    grads = torch.autograd.grad(loss, weights)
    for idx, grad in zip((0, 2), grads):
        assert rel_err(session.state.layers[idx].delta[0], -0.05 * grad) < 1e-4


def test_pieces_are_scored_then_learned_at_chunk_end():
    model, _ = gradient_model(seed=1)
    ids = torch.randint(0, 101, (1, 24))
    whole = TTTSession(model)
    a = torch.cat([whole.feed(ids[:, i : i + 8]).logits for i in range(0, 24, 8)], 1)
    pieces = TTTSession(model)
    b = torch.cat([pieces.feed(ids[:, s:e]).logits for s, e in [(0, 3), (3, 11), (11, 12), (12, 24)]], 1)
    assert rel_err(a, b) < 1e-5
    for idx, layer in whole.state:
        assert rel_err(pieces.state.layers[idx].delta, layer.delta) < 1e-5


@pytest.mark.parametrize("loss", ["cross_entropy", "entropy"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_dynamic_evaluation_lowers_loss_on_repeated_text(loss, optimizer):
    lr = 2.0 if optimizer == "sgd" else 0.03
    model, _ = gradient_model(seed=2, gradient_loss=loss, gradient_optimizer=optimizer, gradient_lr=lr,
                              gradient_steps=2)
    torch.manual_seed(3)
    text = torch.randint(0, 101, (1, 32))
    session = TTTSession(model)
    first = session.feed(text).nll[0, 1:].mean()
    session.reset(keep_state=True)
    second = session.feed(text).nll[0, 1:].mean()
    if loss == "cross_entropy":
        assert second < first - 0.04
    else:  # entropy minimisation sharpens predictions; the state moved
        assert all(n.item() > 0 for n in session.state.norms().values())


def test_gradient_objective_respects_the_delta_cap():
    model, _ = gradient_model(seed=4, gradient_lr=10.0, max_delta_ratio=0.002)
    session = TTTSession(model)
    session.feed(torch.randint(0, 101, (1, 32)))
    assert all(r.item() <= 0.002 + 1e-7 for r in session.state.delta_ratios(model).values())
