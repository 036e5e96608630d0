"""One MLP layer alone: base gated MLP vs the In-Place TTT MLP, time per call and top kernels.

    python -m bench.ttt_mlp --device cuda --lengths 4096 32768      # Qwen3-0.6B's MLP shape, bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

from ttt_model.config import TTTConfig
from ttt_model.model.layer import InPlaceTTTMLP


def time_per_call(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            module(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    base = Qwen3MLP(Qwen3Config(hidden_size=args.hidden, intermediate_size=args.intermediate))
    base = base.to(args.device, dtype)
    ttt = InPlaceTTTMLP(base, TTTConfig(chunk_size=args.chunk), 0)
    with torch.no_grad():
        ttt.ttt_conv.weight.normal_(0, 0.02)
    activity = ProfilerActivity.CUDA if args.device.startswith("cuda") else ProfilerActivity.CPU
    sort_key = "self_cuda_time_total" if activity == ProfilerActivity.CUDA else "self_cpu_time_total"
    for length in args.lengths:
        x = torch.randn(1, length, args.hidden, device=args.device, dtype=dtype)
        t_base, t_ttt = time_per_call(base, x, args.repeats), time_per_call(ttt, x, args.repeats)
        print(f"{length} tokens: base MLP {t_base * 1e6:.0f} us, TTT MLP {t_ttt * 1e6:.0f} us "
              f"({t_ttt / t_base:.2f}x)", flush=True)
        with torch.inference_mode(), profile(activities=[activity]) as prof:
            ttt(x)
            if x.is_cuda:
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by=sort_key, row_limit=args.top, max_name_column_width=90))


if __name__ == "__main__":
    main()
