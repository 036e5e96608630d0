"""Context parallelism: one document split into contiguous segments over the ranks of a
``torch.distributed`` process group (gloo on CPU, nccl on GPU).

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

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.cache_utils import Cache

from ttt_model.forward_call import ttt_forward
from ttt_model.state import FastWeightState, LayerFastWeights, accumulator_dtype
from ttt_model.update_rule import multiply_accumulate


class CommunicationTimer:
    """Seconds spent inside this module's collectives (synchronised on CUDA), for benchmarks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "CommunicationTimer":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start


@dataclass(frozen=True)
class ContextParallelGroup:
    """Which contiguous segment of the document this rank holds."""

    rank: int
    lengths: tuple[int, ...]  # tokens per rank, in order
    group: dist.ProcessGroup | None = None
    timer: CommunicationTimer | None = None

    def collective(self):
        return self.timer if self.timer is not None else contextlib.nullcontext()

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def start(self) -> int:
        return sum(self.lengths[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.lengths[self.rank]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def bounds(self, q: int) -> tuple[int, int]:
        s = sum(self.lengths[:q])
        return s, s + self.lengths[q]


def split_lengths(total: int, world: int, attention_weight: float = 0.0) -> tuple[int, ...]:
    """Contiguous segments of equal cost, where the token at position i costs
    ``1 + attention_weight * i`` (its projections and MLP, plus attention over i keys): with
    ``attention_weight`` 0, near-equal lengths; above 0, later segments get fewer tokens, since
    their queries see more keys. Measure the weight as (b / a) of a forward time a*N + b*N^2."""
    if total < world:
        raise ValueError(f"cannot split {total} tokens over {world} ranks")
    if attention_weight <= 0:
        base, extra = divmod(total, world)
        return tuple(base + (1 if q < extra else 0) for q in range(world))
    w = attention_weight

    def cost(n: float) -> float:  # cost of the first n tokens
        return n + w * n * n / 2

    bounds = [0]
    for q in range(1, world):
        target = cost(total) * q / world
        n = (-1 + (1 + 2 * w * target) ** 0.5) / w  # cost(n) = target
        bounds.append(min(max(int(round(n)), bounds[-1] + 1), total - (world - q)))
    bounds.append(total)
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def all_gather_rows(x: torch.Tensor, cp: ContextParallelGroup, dim: int) -> list[torch.Tensor]:
    """Every rank's ``x`` (lengths differ along ``dim``): padded to the longest, gathered, trimmed."""
    longest = max(cp.lengths)
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, longest - x.shape[dim]]
    padded = F.pad(x, pad).contiguous()
    out = [torch.empty_like(padded) for _ in range(cp.world)]
    with cp.collective():
        dist.all_gather(out, padded, group=cp.group)
    return [t.narrow(dim, 0, n) for t, n in zip(out, cp.lengths)]


def all_gather_same(x: torch.Tensor, cp: ContextParallelGroup) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(cp.world)]
    with cp.collective():
        dist.all_gather(out, x.contiguous(), group=cp.group)
    return out


class ContextParallelCache(Cache):
    """Keys and values of every earlier segment, gathered layer by layer during the forward.

    It reports the segment's start as the cache length, so the model builds the causal mask and
    the RoPE positions of its queries at their global positions.
    """

    def __init__(self, cp: ContextParallelGroup):
        super().__init__(layers=[])
        self.cp = cp

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cp.start

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.cp.start + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys = all_gather_rows(key_states, self.cp, dim=2)[: self.cp.rank + 1]
        values = all_gather_rows(value_states, self.cp, dim=2)[: self.cp.rank + 1]
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)


CP_ATTENTION = "ttt_context_parallel_sdpa"


def _context_parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of this segment's L queries over the S keys it holds (the last L are its own),
    causal aligned to the bottom right. On CUDA: two flash-attention calls, the earlier segments'
    keys unmasked and its own keys causal, merged by their log-sum-exp (as ring attention does);
    elsewhere SDPA with a lower-right ``CausalBias``. A materialised L x S mask would take SDPA's
    slow path, and GBs, at long context."""
    B, H, L, hd = query.shape
    S, Hkv = key.shape[2], key.shape[1]
    groups = H // Hkv
    if S == L:  # the first segment: plain causal attention (keys repeated, as HF's SDPA path does,
        # so that SDPA picks its flash kernel)
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    elif query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        # Earlier keys, no mask: the query heads sharing a key head are stacked along the
        # sequence, so the keys need no repeating (S can be long).
        stacked = query.reshape(B, Hkv, groups * L, hd)
        earlier, lse_earlier = _attention_with_lse(stacked, key[:, :, : S - L], value[:, :, : S - L], False, scaling)
        earlier, lse_earlier = earlier.reshape(B, H, L, hd), lse_earlier.reshape(B, H, L)
        own_k, own_v = key[:, :, S - L :], value[:, :, S - L :]
        if groups > 1:
            own_k, own_v = own_k.repeat_interleave(groups, dim=1), own_v.repeat_interleave(groups, dim=1)
        own, lse_own = _attention_with_lse(query, own_k, own_v, True, scaling)
        lse_own = lse_own.reshape(B, H, L)
        top = torch.maximum(lse_earlier, lse_own)
        w_earlier, w_own = torch.exp(lse_earlier - top)[..., None], torch.exp(lse_own - top)[..., None]
        out = ((earlier.float() * w_earlier + own.float() * w_own) / (w_earlier + w_own)).to(query.dtype)
    else:
        from torch.nn.attention.bias import causal_lower_right

        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(L, S), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _attention_with_lse(q, k, v, causal: bool, scale):
    """(output, log-sum-exp) from cuDNN attention (SDPA's fastest kernel on Hopper), else flash."""
    try:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    except RuntimeError:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _no_mask(*args, **kwargs):
    return None  # the attention above applies the causal structure itself (no padding here)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CP_ATTENTION, _context_parallel_attention)
    AttentionMaskInterface.register(CP_ATTENTION, _no_mask)


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def context_parallel_forward(model, input_ids: torch.Tensor, cp: ContextParallelGroup,
                             state: FastWeightState | None = None, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits of this rank's segment ``input_ids`` (B, L_rank) of a document split over ``cp``.

    With ``state`` (which must have no unfinished chunk), the TTT layers start from its fast
    weights and leave the state after the whole document in it, identical on every rank.
    """
    if input_ids.shape[1] != cp.lengths[cp.rank]:
        raise ValueError(f"rank {cp.rank} holds {cp.lengths[cp.rank]} tokens, got {input_ids.shape[1]}")
    _register_attention()

    def layer_rule(mlp, h, t, fast):
        return apply_then_update_parallel(mlp, h, t, fast, cp)

    with torch.no_grad(), _attention_implementation(model, CP_ATTENTION), \
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


def all_gather_rows_padded(x: torch.Tensor, cp: ContextParallelGroup) -> list[torch.Tensor]:
    """Like all_gather_rows for pieces whose lengths are not the segment lengths."""
    n = torch.tensor([x.shape[1]], device=x.device)
    sizes = [int(v) for v in all_gather_same(n, cp)]
    longest = max(max(sizes), 1)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[1]))
    gathered = all_gather_same(padded, cp)
    return [g[:, :m] for g, m in zip(gathered, sizes)]
