"""The head's loss and gradient in one pass equal autograd through a float64 log-softmax, position
by position, in one block and in many, with per-position weights (zero: scored, not learned).
The fused kernel runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, read when
the kernel is defined, hence a process of its own), as in test_token_nll."""

import pytest
import torch

from tests.conftest import through_triton_interpreter

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


KERNEL_CHECK = """
import json
import torch
import ttt_model.slow.head_loss as head_loss
from tests.ttt_model.test_head_loss import reference

head_loss.FUSED_BLOCK_V = 64  # several steps along each row, the last one partial
errors = []
for dtype in (torch.float64, torch.float32):
    for n, d, V, block_elements in ((11, 16, 300, 1 << 25), (7, 8, 50, 3 * 50), (5, 4, 64, 1 << 25)):
        head_loss.BLOCK_ELEMENTS = block_elements
        gen = torch.Generator().manual_seed(n)
        hidden = (3 * torch.randn(n, d, generator=gen)).to(dtype)
        weight = torch.randn(V, d, generator=gen).to(dtype)
        targets = torch.randint(0, V, (n,), generator=gen)
        scale = torch.rand(n, generator=gen, dtype=torch.float64)
        scale[2] = 0.0
        nll, grad = head_loss.head_nll_and_grad(hidden, weight, targets, scale, fused=True)
        want_nll, want_grad = reference(hidden, weight, targets, scale)
        errors.append({"dtype": str(dtype), "V": V, "nll_dtype": str(nll.dtype), "grad_dtype": str(grad.dtype),
                       "nll": (nll.double() - want_nll).abs().max().item(),
                       "grad": ((grad.double() - want_grad).abs().max() / want_grad.abs().max()).item(),
                       "unlearned": grad[2].abs().max().item()})
# bf16, as the learner runs: against the plain form (the same rounding points), not float64.
head_loss.BLOCK_ELEMENTS = 3 * 300
gen = torch.Generator().manual_seed(3)
hidden = torch.randn(11, 16, generator=gen).bfloat16()
weight = torch.randn(300, 16, generator=gen).bfloat16()
targets = torch.randint(0, 300, (11,), generator=gen)
scale = torch.rand(11, generator=gen, dtype=torch.float64)
(nll, grad), (want_nll, want_grad) = (head_loss.head_nll_and_grad(hidden, weight, targets, scale, fused=f)
                                      for f in (True, False))
errors.append({"dtype": "torch.bfloat16", "V": 300, "nll_dtype": str(nll.dtype), "grad_dtype": str(grad.dtype),
               "nll": (nll.double() - want_nll.double()).abs().max().item(),
               "grad": ((grad.double() - want_grad.double()).abs().max() / want_grad.double().abs().max()).item(),
               "unlearned": 0.0})
print(json.dumps(errors))
"""


def test_the_fused_kernel_equals_autograd_through_the_triton_interpreter():
    results = through_triton_interpreter(KERNEL_CHECK)
    assert len(results) == 7
    for r in results:
        wide = r["dtype"] == "torch.float64"
        assert r["nll_dtype"] == ("torch.float64" if wide else "torch.float32") and r["grad_dtype"] == r["dtype"]
        # bf16: the plain form's result within two roundings (the gradient logits', which float32 exp
        # and log of numpy or torch may put on either side, and the product's): 2^-7 of its largest entry
        bound = {"torch.float64": 1e-12, "torch.float32": 1e-5, "torch.bfloat16": 1e-5}[r["dtype"]]
        assert r["nll"] < bound and r["grad"] < (2 ** -7 if r["dtype"] == "torch.bfloat16" else bound), r
        assert r["unlearned"] == 0.0  # weight 0: scored, not learned from
