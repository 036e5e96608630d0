"""The forward of one rank's segment of a document split over a context-parallel group.

Per layer, attention sees every earlier key and value (all-gathered into a cache that reports
the segment's start as its length, so the model's own causal mask and RoPE positions are the
global ones), and each TTT layer combines the chunk updates across ranks by an exclusive scan:

- every rank computes, with a halo of ``kernel // 2`` target rows from its neighbours, the
  update contributions of its own tokens: ``Z`` for chunks that end inside its segment and ``Y``
  for its trailing chunk when a later rank finishes it;
- all-gathering (Z, Y) gives each rank the sum of every complete chunk before its first one, and
  the part of its first chunk that an earlier rank holds;
- each rank then walks its own chunks apply-then-update, exactly as the single-process loop does.

After the forward the streaming state (dW and the unfinished chunk's tail) is the same on every
rank. The per-update safeguards (clip, decay, cap) make each update depend on the weights before
it: then the ranks pass the running weights on in rank order, each stepping only its own chunk
updates (elementwise work and norms, cheap next to attention), before serving in parallel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ttt_model.model.forward_call import ttt_forward
from ttt_model.parallel.attention import ContextParallelCache, context_parallel_attention
from ttt_model.parallel.group import ContextParallelGroup, all_gather_rows_padded, all_gather_same
from ttt_model.model.state import FastWeightState, LayerFastWeights, accumulator_dtype
from ttt_model.model.update_rule import multiply_accumulate


def context_parallel_forward(model, input_ids: torch.Tensor, cp: ContextParallelGroup,
                             state: FastWeightState | None = None, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits of this rank's segment ``input_ids`` (B, L_rank) of a document split over ``cp``.

    With ``state`` (which must have no unfinished chunk), the TTT layers start from its fast
    weights and leave the state after the whole document in it, identical on every rank.
    """
    if input_ids.shape[1] != cp.lengths[cp.rank]:
        raise ValueError(f"rank {cp.rank} holds {cp.lengths[cp.rank]} tokens, got {input_ids.shape[1]}")

    def layer_rule(mlp, h, t, fast):
        return apply_then_update_parallel(mlp, h, t, fast, cp)

    with torch.no_grad(), context_parallel_attention(model), \
            ttt_forward(state=state, layer_rule=layer_rule):
        return model(input_ids=input_ids, past_key_values=ContextParallelCache(cp), use_cache=True,
                     logits_to_keep=logits_to_keep).logits


@torch.no_grad()
def apply_then_update_parallel(mlp, h: torch.Tensor, t: torch.Tensor, fast: LayerFastWeights | None,
                               cp: ContextParallelGroup) -> torch.Tensor:
    """The TTT MLP's down projection for this rank's tokens, with fast weights from all chunks
    before each token's chunk, wherever they were computed.

    Without safeguards the chunk updates simply add up, so each rank's starting weights are one
    all-gathered sum. With them (clip, decay, cap) each update depends on the weights before it:
    the ranks then pass the weights on in rank order, each walking only its own chunks' updates
    (computed beforehand, in parallel), and serve their tokens afterwards, in parallel again.
    """
    config = mlp.config
    if fast is not None and fast.tail_len:
        raise ValueError("context-parallel forward needs a state with no unfinished chunk (call end_document)")
    C, half = config.chunk_size, config.conv_kernel // 2
    s, e, N = cp.start, cp.end, cp.total
    B, L, D = h.shape
    weight = mlp.down_proj.weight
    acc = accumulator_dtype(weight.dtype)

    # Targets of this rank's chunks, chunk-aligned, with the neighbours' halo rows.
    k0, k1 = s // C, (e - 1) // C
    lo = k0 * C
    buffer = t.new_zeros(B, (k1 - k0 + 1) * C, t.shape[2])
    buffer[:, s - lo : e - lo] = t
    if half:
        edges = all_gather_same(torch.cat([F.pad(t[:, :half], (0, 0, 0, max(0, half - L))),
                                           F.pad(t[:, -half:], (0, 0, max(0, half - L), 0))], dim=1), cp)
        for q in range(cp.world):
            qs, qe = cp.bounds(q)
            n = min(half, qe - qs)
            for pos, row in [(qs + i, edges[q][:, i]) for i in range(n)] + \
                            [(qe - n + i, edges[q][:, 2 * half - n + i]) for i in range(n)]:
                if lo <= pos < lo + buffer.shape[1] and not s <= pos < e and (s - half <= pos < e + half):
                    buffer[:, pos - lo] = row
    values = mlp.update_values(buffer).reshape(B, -1, t.shape[2])[:, s - lo : e - lo]  # eta V, (B, L, d)

    def contribution(a: int, b: int) -> torch.Tensor:  # global rows [a, b) of this rank
        out = torch.zeros(B, weight.shape[0], D, dtype=acc, device=h.device)
        return multiply_accumulate(out, values[:, a - s : b - s].transpose(1, 2), h[:, a - s : b - s])

    zero = torch.zeros(B, weight.shape[0], D, dtype=acc, device=h.device)
    complete_end = (e // C) * C  # chunks ending at or before this are complete by the end of the segment
    y = contribution(max(complete_end, s), e) if e % C else zero
    ys = all_gather_same(y, cp)
    carry = zero.clone()  # the part of our first chunk that earlier ranks hold
    for q in range(cp.rank):
        _, qe = cp.bounds(q)
        if qe % C and qe // C == k0:
            carry += ys[q]
    # This rank's chunks: (first token, end, this rank's part of the update if the chunk ends in
    # this segment, else None); the whole update adds the carry to the first chunk's part.
    chunks = []
    for k in range(k0, k1 + 1):
        a, b = max(k * C, s), min((k + 1) * C, e)
        chunks.append((a, b, contribution(a, b) if (k + 1) * C <= e else None))

    def updates():
        for i, (a, b, own) in enumerate(chunks):
            yield a, b, None if own is None else own + carry if i == 0 else own

    start_delta = fast.delta.to(acc) if fast is not None else zero

    if config.has_safeguards:
        # The weights pass from rank to rank: rank q walks its updates from what rank q - 1 sent.
        buffer = start_delta.clone()
        for q in range(cp.world):
            if q == cp.rank:
                start = buffer.clone()
                walk = mlp.walk(start)
                for _, _, update in updates():
                    if update is not None:
                        walk.add(update)
                buffer = walk.delta.clone()  # not ``start`` itself, which later broadcasts overwrite
            with cp.collective():
                dist.broadcast(buffer, src=q, group=cp.group)
        end_delta = buffer
    else:
        z = sum((own for _, _, own in chunks if own is not None), zero)
        zs = all_gather_same(z, cp)
        start = start_delta.clone()
        for q in range(cp.rank):
            _, qe = cp.bounds(q)
            start += zs[q]
            if qe % C and qe // C < k0:
                start += ys[q]  # its trailing chunk was finished before ours began
        end_delta = start_delta + sum(zs)
        for q in range(cp.world):
            _, qe = cp.bounds(q)
            if qe % C and (qe // C + 1) * C <= N:
                end_delta = end_delta + ys[q]

    walk = mlp.walk(start)
    outputs = []
    for a, b, update in updates():
        outputs.append(walk.serve(h[:, a - s : b - s]))
        if update is not None:
            walk.add(update)
    out = torch.cat(outputs, dim=1)

    if fast is not None:
        tail_start = (N // C) * C
        a = max(tail_start, s)
        tails_h = all_gather_rows_padded(h[:, a - s :] if a < e else h[:, :0], cp)
        tails_t = all_gather_rows_padded(t[:, a - s :] if a < e else t[:, :0], cp)
        fast.delta = end_delta
        fast.tail_h, fast.tail_t = torch.cat(tails_h, dim=1), torch.cat(tails_t, dim=1)
        fast.tokens_seen += N
        fast.updates += N // C
    return out
