"""The language-model head's next-token loss and its gradient, in one pass over the vocabulary.

A slow step needs two things of the head: the per-token loss (the score the stream reports)
and the gradient of the mean loss with respect to the decoder's last hidden states (what
flows back into the adapted layers). Autograd through ``lm_head`` would keep the (tokens, vocab)
logits and their gradient alive until the backward; here both come out of the same logits,
computed block by block of positions and dropped at once:

    logits = h W^T                   (n, V), in float32 (float64 for float64 inputs)
    nll    = logsumexp(logits) - logits[target]
    dh     = scale * (softmax(logits) - onehot(target)) W

so that the head costs one product for the score and one for the gradient, and memory stays
at one block of logits whatever the document's length.

Between the two products, the plain form turns each block of logits into float32 and walks it
about eight times (the copy, the log-sum-exp, the subtraction, the exponential, the scale, the
copy back). On a GPU one Triton kernel does it in two reads of the block as the product left it
(bf16): a running log-sum-exp per position, then ``scale * (softmax - onehot)`` written over the
logits in place, ready for the second product. The rounding points are the plain form's (the
logits as the product gives them, float32 arithmetic, the gradient's dtype before the product).
Anything but a CUDA tensor with Triton installed takes the plain form, the kernel's reference in
tests (through Triton's interpreter, the kernel runs on the CPU too).
"""

from __future__ import annotations

import torch

from ttt_model.model.chunk_conv import fused_kernel_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs ship without Triton
    triton = None

# Logit elements per block (rows x vocabulary): 64M float32 is 256 MB, a few blocks for a
# document of several thousand tokens on a 150k vocabulary (each block is ~8 launches).
BLOCK_ELEMENTS = 1 << 26
# Vocabulary entries per step of the fused kernel's walk along a row.
FUSED_BLOCK_V = 4096


def head_nll_and_grad(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | float,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position nll of ``targets`` under the logits ``hidden @ weight.T``, and the gradient
    of ``scale * nll.sum()`` with respect to ``hidden``.

    hidden (n, d) (no graph needed: the caller backpropagates the returned gradient), weight
    (V, d), targets (n,) token ids; ``scale`` a number or (n,) weights per position (0: a
    position scored but not learned from). Returns nll (n,) in float32 (float64 for float64
    inputs) and the gradient (n, d) in ``hidden``'s dtype. ``fused`` None takes the Triton
    kernel where it can run; True insists on it (which reads ``targets`` as given: token ids of
    the vocabulary, unchecked on the device).
    """
    if fused is None:
        fused = fused_kernel_available(hidden)
    n, V = hidden.shape[0], weight.shape[0]
    wide = torch.promote_types(hidden.dtype, torch.float32)
    hidden, weight = hidden.detach(), weight.detach()
    nll = torch.empty(n, dtype=wide, device=hidden.device)
    grad = torch.empty_like(hidden)
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((n,), float(scale), dtype=wide, device=hidden.device)
    rows = max(1, BLOCK_ELEMENTS // V)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        if fused:
            logits = hidden[lo:hi] @ weight.T
            nll[lo:hi] = _softmax_grad_triton(logits, targets[lo:hi], scale[lo:hi])
            grad[lo:hi] = (logits.to(weight.dtype) @ weight).to(grad.dtype)
            continue
        logits = (hidden[lo:hi] @ weight.T).to(wide)
        target = targets[lo:hi, None]
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        nll[lo:hi] = (lse - logits.gather(1, target))[:, 0]
        # softmax - onehot, in place in the logits' memory
        probs = logits.sub_(lse).exp_()
        probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=wide))
        probs.mul_(scale[lo:hi, None].to(wide))
        grad[lo:hi] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
    return nll, grad


def _softmax_grad_triton(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """nll (n,) of ``targets`` under ``logits`` (n, V), and ``logits`` overwritten by
    ``scale * (softmax(logits) - onehot(targets))`` in their own dtype."""
    if triton is None:
        raise RuntimeError("the fused head gradient needs Triton (pip install triton)")
    n, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("the fused head gradient writes the logits in place: their rows must be contiguous")
    wide = logits.dtype == torch.float64
    acc = torch.float64 if wide else torch.float32
    nll = torch.empty(n, dtype=acc, device=logits.device)
    _softmax_grad_kernel[(n,)](
        logits, targets.contiguous(), scale.to(acc).contiguous(), nll, V, logits.stride(0),
        BLOCK_V=min(FUSED_BLOCK_V, triton.next_power_of_2(V)), ACC=tl.float64 if wide else tl.float32, num_warps=8,
    )
    return nll


if triton is not None:
    from ttt_model.model.token_nll import row_logsumexp

    @triton.jit
    def _softmax_grad_kernel(x_ptr, target_ptr, scale_ptr, nll_ptr, vocab, stride,
                             BLOCK_V: tl.constexpr, ACC: tl.constexpr):
        i = tl.program_id(0)
        row = x_ptr + i.to(tl.int64) * stride
        cols = tl.arange(0, BLOCK_V)
        lse = row_logsumexp(row, vocab, BLOCK_V, ACC)  # the first read
        target = tl.load(target_ptr + i)
        tl.store(nll_ptr + i, lse - tl.load(row + target).to(ACC))
        # Second read: the gradient of scale * nll with respect to the logits, over them.
        weight = tl.load(scale_ptr + i)
        for start in range(0, vocab, BLOCK_V):
            inside = start + cols < vocab
            x = tl.load(row + start + cols, mask=inside, other=float("-inf")).to(ACC)
            g = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
            tl.store(row + start + cols, (weight * g).to(x_ptr.dtype.element_ty), mask=inside)
