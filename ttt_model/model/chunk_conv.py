"""The depthwise conv of In-Place TTT's targets, restarted in every chunk: one kernel on a GPU.

For targets t (B, n*C, d) and taps w (k, d) (eta folded in; Conv1d cross-correlates):

    out[b, i, p] = sum_j w[j] * t[b, i*C + p + j - k//2]    over 0 <= p + j - k//2 < C

Each chunk sees only its own tokens (zero border), so a chunk's values never read the next
chunk. The plain form is k shifted multiply-adds over a padded copy (about k + 3 passes over the
targets, each a launch); the Triton kernel reads each target once from memory, sums the k taps
in float32 (float64 for float64 inputs) and writes the result once. The prefill of a few
thousand tokens is bound by such launches, so the GPU takes the kernel whenever Triton is there;
anything else (CPU, no Triton, autograd) takes the plain form, the kernel's reference in tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs ship without Triton
    triton = None


def chunk_conv(t: torch.Tensor, taps: torch.Tensor, chunk_size: int, fused: bool | None = None) -> torch.Tensor:
    """The chunk-restarted depthwise conv of ``t`` (B, n*C, d) with ``taps`` (k, d): (B, n, C, d).

    ``fused`` None takes the Triton kernel where it can run (CUDA tensors, Triton installed, no
    gradient needed); True insists on it (on CPU tensors it then needs TRITON_INTERPRET=1).
    """
    if fused is None:
        fused = fused_kernel_available(t) and not (torch.is_grad_enabled() and (t.requires_grad or taps.requires_grad))
    if fused:
        return _chunk_conv_triton(t, taps, chunk_size)
    return chunk_conv_plain(t, taps, chunk_size)


def fused_kernel_available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def chunk_conv_plain(t: torch.Tensor, taps: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """k shifted multiply-adds in the (C, d) layout (nn.Conv1d's (d, C) layout costs two
    transposing copies and a slow generic depthwise kernel on GPU); differentiable."""
    B, T, d = t.shape
    C, k = chunk_size, taps.shape[0]
    n, half = T // C, k // 2
    # Each chunk gets its own zero border, then every tap is one contiguous pass over the
    # flattened buffer; rows computed in the borders are garbage and dropped below.
    padded = F.pad(t.reshape(B * n, C, d), (0, 0, half, half)).reshape(-1, d)  # (B*n*(C+2h), d)
    rows = padded.shape[0] - 2 * half
    mixed = torch.zeros_like(padded)
    inner = mixed[half : half + rows]
    for j in range(k):
        inner.addcmul_(padded[j : j + rows], taps[j])
    return mixed.reshape(B * n, C + 2 * half, d)[:, half : half + C].reshape(B, n, C, d)


def _chunk_conv_triton(t: torch.Tensor, taps: torch.Tensor, chunk_size: int) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("the fused chunk conv needs Triton (pip install triton)")
    B, T, d = t.shape
    C, k = chunk_size, taps.shape[0]
    n = T // C
    if t.stride(2) != 1:
        t = t.contiguous()
    taps = taps.contiguous()
    out = torch.empty(B, n, C, d, device=t.device, dtype=t.dtype)
    block_t, block_d = 32, min(256, triton.next_power_of_2(d))
    grid = (triton.cdiv(n * C, block_t), triton.cdiv(d, block_d), B)
    _chunk_conv_kernel[grid](
        t, taps, out, n * C, d, C, t.stride(0), t.stride(1),
        K=k, BLOCK_T=block_t, BLOCK_D=block_d, ACC=tl.float64 if t.dtype == torch.float64 else tl.float32,
    )
    return out


if triton is not None:

    @triton.jit
    def _chunk_conv_kernel(
        t_ptr, taps_ptr, out_ptr, tokens, d, chunk, stride_b, stride_t,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # token index in the sequence
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        b = tl.program_id(2)
        row_ok, col_ok = rows < tokens, cols < d
        place = rows % chunk  # position inside the chunk: the border is the chunk's own
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
        for j in tl.static_range(K):
            shifted = place + (j - K // 2)
            ok = row_ok & (shifted >= 0) & (shifted < chunk)
            source = t_ptr + b * stride_b + (rows + (j - K // 2))[:, None] * stride_t + cols[None, :]
            x = tl.load(source, mask=ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
            w = tl.load(taps_ptr + j * d + cols, mask=col_ok, other=0.0).to(ACC)
            acc += x * w[None, :]
        target = out_ptr + (b * tokens + rows)[:, None] * d + cols[None, :]
        tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
