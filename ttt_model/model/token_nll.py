"""-log p(target) at every position of a document, from its logits: one kernel on a GPU.

Scoring a document needs each position's log-sum-exp over the whole vocabulary. The plain form
turns blocks of the (bf16) logits into float32 and runs log-softmax on them: about four passes
over 151,936 entries per token, and a float32 copy of each block. The Triton kernel reads every
logit once, keeps a running maximum and sum in float32 (float64 for float64 logits) and writes
one number per position. On an H200 it takes the loss of 8 x 2k tokens of Qwen3's vocabulary
from ~22 ms to ~2 ms. Anything but a CUDA tensor with Triton installed takes the plain form, the
kernel's reference in tests (and through Triton's interpreter, the kernel runs there too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttt_model.model.chunk_conv import fused_kernel_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs ship without Triton
    triton = None

# Rows of logits turned into float32 at a time by the plain form: 2,048 x 151,936 entries
# (Qwen3's vocabulary) is 1.2 GB, where a whole 32k-token document at once would be 20 GB.
NLL_ROWS = 2048


@torch.no_grad()
def token_nll(logits: torch.Tensor, targets: torch.Tensor, rows: int = NLL_ROWS, fused: bool | None = None) -> torch.Tensor:
    """-log p(targets) per position, float32 (float64 for float64 logits): logits (..., V),
    targets (...) -> (...).

    ``logits`` may be a strided view such as ``logits[:, :-1]`` (the kernel reads it in place).
    ``fused`` None takes the Triton kernel where it can run; True insists on it.
    """
    if fused is None:
        fused = fused_kernel_available(logits)
    if fused:
        return _token_nll_triton(logits, targets)
    return token_nll_plain(logits, targets, rows)


def token_nll_plain(logits: torch.Tensor, targets: torch.Tensor, rows: int = NLL_ROWS) -> torch.Tensor:
    """Blocks of ``rows`` positions in float32 through cross-entropy (never a float32 copy of
    the whole document's logits)."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat, wanted = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = torch.empty(wanted.shape, dtype=out_dtype, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        block = flat[start : start + rows]
        out[start : start + rows] = F.cross_entropy(block.to(out_dtype), wanted[start : start + rows], reduction="none")
    return out.reshape(targets.shape)


def _as_3d(logits: torch.Tensor) -> torch.Tensor:
    """(A, P, V) view of (..., V) logits: the two leading strides are what the kernel takes, so
    ``logits[:, :-1]`` of a (B, L, V) tensor needs no copy."""
    if logits.dim() == 1:
        return logits[None, None]
    if logits.dim() == 2:
        return logits[None]
    if logits.dim() == 3:
        return logits
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def _token_nll_triton(logits: torch.Tensor, targets: torch.Tensor, block: int = 4096) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("the fused token NLL needs Triton (pip install triton)")
    x = _as_3d(logits)
    if x.stride(2) != 1:
        x = x.contiguous()
    A, P, V = x.shape
    wanted = targets.reshape(A, P).contiguous()
    wide = x.dtype == torch.float64
    out = torch.empty(A, P, dtype=torch.float64 if wide else torch.float32, device=x.device)
    block = min(block, triton.next_power_of_2(V))
    _token_nll_kernel[(P, A)](
        x, wanted, out, V, x.stride(0), x.stride(1), P,
        BLOCK_V=block, ACC=tl.float64 if wide else tl.float32, num_warps=8,
    )
    return out.reshape(targets.shape)


if triton is not None:

    @triton.jit
    def row_logsumexp(row, vocab, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
        """log-sum-exp of the ``vocab`` entries at ``row``, read once, block by block, with a
        running maximum and sum in ``ACC``. Entries at -inf (masked tokens, or past the end) add
        nothing, also while the running maximum is still -inf, where exp(-inf - -inf) would be NaN."""
        cols = tl.arange(0, BLOCK_V)
        top = tl.full((), float("-inf"), ACC)
        total = tl.zeros((), ACC)
        for start in range(0, vocab, BLOCK_V):
            x = tl.load(row + start + cols, mask=start + cols < vocab, other=float("-inf")).to(ACC)
            new_top = tl.maximum(top, tl.max(x, axis=0))
            kept = tl.where(top == new_top, 1.0, tl.exp(top - new_top))
            total = total * kept + tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - new_top)), axis=0)
            top = new_top
        return top + tl.log(total)

    @triton.jit
    def _token_nll_kernel(
        x_ptr, target_ptr, out_ptr, vocab, stride_a, stride_p, positions,
        BLOCK_V: tl.constexpr, ACC: tl.constexpr,
    ):
        p = tl.program_id(0)
        a = tl.program_id(1)
        row = x_ptr + a.to(tl.int64) * stride_a + p.to(tl.int64) * stride_p
        lse = row_logsumexp(row, vocab, BLOCK_V, ACC)
        target = tl.load(target_ptr + a * positions + p)
        picked = tl.load(row + target).to(ACC)
        tl.store(out_ptr + a * positions + p, lse - picked)
