"""-log p(target) per position (``ttt_model.model.token_nll``): the plain form and the Triton kernel
against a float64, position-by-position log-softmax on random logits.

The kernel runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, read when the
kernel is defined, hence a process of its own), as in test_chunk_conv."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import through_triton_interpreter
from ttt_model.model.token_nll import token_nll, token_nll_plain

CASES = [  # batch, positions, vocabulary, kernel block (several blocks, the last one partial)
    (2, 37, 50, 16), (1, 5, 300, 64), (3, 4, 7, 8), (2, 6, 1000, 128),
]


def reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = torch.empty(targets.shape, dtype=torch.float64)
    for b in range(targets.shape[0]):
        for i in range(targets.shape[1]):
            row = logits[b, i].double()
            out[b, i] = -(row[targets[b, i]] - torch.logsumexp(row, 0))
    return out


def random_case(case, seed: int, dtype=torch.float64):
    """Logits of one more position than scored, scored as ``logits[:, :-1]``: the strided view
    the reader passes. Scaled so that the softmax is far from uniform."""
    B, P, V, _ = case
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(B, P + 1, V, generator=g, dtype=torch.float64)).to(dtype)
    return logits[:, :-1], torch.randint(0, V, (B, P), generator=g)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_plain_form_equals_the_reference(case, dtype):
    logits, targets = random_case(case, seed=sum(case[:3]), dtype=dtype)
    got = token_nll_plain(logits, targets, rows=3)  # several row blocks, the last one partial
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == targets.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), reference(logits, targets), rtol=tol, atol=tol)


def test_cpu_tensors_take_the_plain_form():
    logits, targets = random_case(CASES[0], seed=3, dtype=torch.bfloat16)
    assert torch.equal(token_nll(logits, targets), token_nll_plain(logits, targets))


KERNEL_CHECK = """
import json, torch
from tests.ttt_model.test_token_nll import CASES, random_case, reference
from ttt_model.model.token_nll import _token_nll_triton
errors = []
for i, case in enumerate(CASES):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        logits, targets = random_case(case, seed=100 + i, dtype=dtype)
        got = _token_nll_triton(logits, targets, block=case[3])
        want = reference(logits, targets)
        errors.append({"case": case, "dtype": str(dtype), "out_dtype": str(got.dtype),
                       "max_abs": (got.double() - want).abs().max().item()})
# Masked vocabulary entries (-inf), a whole first block of them included.
logits, targets = random_case(CASES[3], seed=7, dtype=torch.float32)
logits = logits.clone()
logits[..., :200] = float("-inf")
logits[0, 0, 500:600] = float("-inf")
targets = targets.clamp(min=600)
got = _token_nll_triton(logits, targets, block=128)
errors.append({"case": "masked", "dtype": "float32", "out_dtype": str(got.dtype),
               "max_abs": (got.double() - reference(logits, targets)).abs().max().item()})
print(json.dumps(errors))
"""


def test_kernel_equals_the_reference_through_the_triton_interpreter():
    results = through_triton_interpreter(KERNEL_CHECK)
    assert len(results) == 3 * len(CASES) + 1
    for r in results:
        bound = {"torch.float64": 1e-12, "torch.float32": 1e-5, "torch.bfloat16": 1e-5}[r["dtype"]] if r["case"] != "masked" else 1e-5
        assert r["out_dtype"] == ("torch.float64" if r["dtype"] == "torch.float64" else "torch.float32")
        assert r["max_abs"] < bound, r
