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
"""

from __future__ import annotations

import torch

# Logit elements per block (rows x vocabulary): 64M float32 is 256 MB, a few blocks for a
# document of several thousand tokens on a 150k vocabulary (each block is ~8 launches).
BLOCK_ELEMENTS = 1 << 26


def head_nll_and_grad(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position nll of ``targets`` under the logits ``hidden @ weight.T``, and the gradient
    of ``scale * nll.sum()`` with respect to ``hidden``.

    hidden (n, d) (no graph needed: the caller backpropagates the returned gradient), weight
    (V, d), targets (n,) token ids; ``scale`` a number or (n,) weights per position (0: a
    position scored but not learned from). Returns nll (n,) in float32 (float64 for float64
    inputs) and the gradient (n, d) in ``hidden``'s dtype.
    """
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
