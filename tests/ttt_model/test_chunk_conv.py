"""The chunk-restarted depthwise conv (``ttt_model.model.chunk_conv``): the plain form and the Triton
kernel against a float64, token-by-token reference on random inputs.

The kernel runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, read when the
kernel is defined, hence a process of its own), so CI checks the GPU's code path without a GPU;
on a GPU the same check runs compiled (``bench/chunk_conv.py``)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import through_triton_interpreter
from ttt_model.model.chunk_conv import chunk_conv, chunk_conv_plain

SHAPES = [  # B, chunks, C, d, k, tokens past the last whole chunk (a strided input)
    (2, 3, 16, 40, 5, 3), (1, 2, 8, 300, 3, 0), (3, 1, 7, 5, 1, 2), (1, 4, 5, 64, 7, 0), (2, 2, 33, 257, 5, 1),
]


def reference(t: torch.Tensor, taps: torch.Tensor, C: int) -> torch.Tensor:
    """out[b, i, p] = sum_j taps[j] * t[b, i*C + p + j - k//2], inside chunk i only."""
    B, T, d = t.shape
    k, n = taps.shape[0], T // C
    out = torch.zeros(B, n, C, d, dtype=torch.float64)
    for b in range(B):
        for i in range(n):
            for p in range(C):
                for j in range(k):
                    q = p + j - k // 2
                    if 0 <= q < C:
                        out[b, i, p] += taps[j].double() * t[b, i * C + q].double()
    return out


def random_inputs(shape, seed: int, dtype=torch.float64):
    B, n, C, d, k, extra = shape
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, n * C + extra, d, generator=g, dtype=dtype)[:, : n * C]
    return t, torch.randn(k, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_plain_form_equals_the_token_by_token_reference(shape):
    t, taps = random_inputs(shape, seed=sum(shape))
    torch.testing.assert_close(chunk_conv_plain(t, taps, shape[2]), reference(t, taps, shape[2]), rtol=1e-12, atol=1e-12)


def test_a_chunk_reads_nothing_of_its_neighbours():
    t, taps = random_inputs((1, 3, 8, 16, 5, 0), seed=1)
    changed = t.clone()
    changed[:, 8:16] += 1.0  # chunk 1 only
    before, after = chunk_conv_plain(t, taps, 8), chunk_conv_plain(changed, taps, 8)
    assert torch.equal(before[:, [0, 2]], after[:, [0, 2]])
    assert not torch.equal(before[:, 1], after[:, 1])


def test_cpu_tensors_take_the_plain_form_without_triton_or_with_autograd():
    t, taps = random_inputs(SHAPES[0], seed=2)
    taps.requires_grad_(True)
    out = chunk_conv(t, taps, SHAPES[0][2])
    out.sum().backward()  # the plain form is differentiable
    assert taps.grad is not None and taps.grad.abs().sum() > 0


KERNEL_CHECK = """
import json, sys, torch
from tests.ttt_model.test_chunk_conv import SHAPES, random_inputs, reference
from ttt_model.model.chunk_conv import chunk_conv
errors = []
for i, shape in enumerate(SHAPES):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        t, taps = random_inputs(shape, seed=100 + i, dtype=dtype)
        out = chunk_conv(t, taps, shape[2], fused=True)
        ref = reference(t, taps, shape[2])
        errors.append([str(dtype), list(out.shape) == list(ref.shape), str(out.dtype),
                       ((out.double() - ref).norm() / ref.norm()).item()])
print(json.dumps(errors))
"""


def test_the_triton_kernel_equals_the_reference_in_the_interpreter():
    errors = through_triton_interpreter(KERNEL_CHECK)
    assert len(errors) == 3 * len(SHAPES)
    bounds = {"torch.float64": 1e-14, "torch.float32": 1e-6, "torch.bfloat16": 1e-2}  # float32 sums, bf16 output
    for dtype, same_shape, out_dtype, error in errors:
        assert same_shape and out_dtype == dtype
        assert error < bounds[dtype], (dtype, error)
