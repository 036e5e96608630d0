"""Attention over a document split among ranks: each segment's queries see every earlier
segment's keys and values, gathered layer by layer into a cache that reports the segment's start
as its length, so that the model's own causal mask and RoPE positions are the global ones."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from ttt_model.parallel.group import ContextParallelGroup, all_gather_rows


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


@contextlib.contextmanager
def context_parallel_attention(model) -> Iterator[None]:
    """``model``'s attention, for the duration, the one above (registered with transformers under
    its own name; the causal structure is applied there, so no mask is built)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CP_ATTENTION, _context_parallel_attention)
    AttentionMaskInterface.register(CP_ATTENTION, _no_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation = CP_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = previous
