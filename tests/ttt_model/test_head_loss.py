"""The head's loss and gradient in one pass equal autograd through a float64 log-softmax, position
by position, in one block and in many, with per-position weights (zero: scored, not learned)."""

import pytest
import torch

import ttt_model.slow.head_loss as head_loss
from ttt_model.slow.head_loss import head_nll_and_grad


def reference(hidden, weight, targets, scale):
    """Autograd of sum_i scale_i * -log softmax(h_i W^T)[t_i], in float64, one position at a time."""
    h = hidden.double().clone().requires_grad_(True)
    nll = torch.stack([-torch.log_softmax(h[i] @ weight.double().T, dim=-1)[targets[i]] for i in range(len(targets))])
    (nll * scale.double()).sum().backward()
    return nll.detach(), h.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_elements", [1 << 25, 3 * 50])  # one block; blocks of 3 rows
def test_nll_and_grad_equal_autograd_in_float64(dtype, tol, block_elements, monkeypatch):
    monkeypatch.setattr(head_loss, "BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(0)
    n, d, V = 11, 16, 50
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = torch.randn(V, d, generator=gen).to(dtype)
    targets = torch.randint(0, V, (n,), generator=gen)
    scale = torch.rand(n, generator=gen, dtype=torch.float64)
    scale[3] = 0.0
    nll, grad = head_nll_and_grad(hidden, weight, targets, scale)
    want_nll, want_grad = reference(hidden, weight, targets, scale)
    assert nll.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
    assert torch.allclose(nll.double(), want_nll, rtol=tol, atol=tol)
    assert torch.allclose(grad.double(), want_grad, rtol=tol, atol=tol * want_grad.abs().max())
    assert torch.equal(grad[3], torch.zeros_like(grad[3]))  # weight 0: scored, not learned from


def test_a_number_scales_every_position():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 8, generator=gen, dtype=torch.float64), torch.randn(20, 8, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 20, (5,), generator=gen)
    _, grad = head_nll_and_grad(hidden, weight, targets, 0.25)
    _, want = reference(hidden, weight, targets, torch.full((5,), 0.25))
    assert torch.allclose(grad, want, rtol=1e-12, atol=1e-14)
