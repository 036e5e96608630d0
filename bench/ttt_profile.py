"""Where the time of one prefill goes: the top kernels with TTT off, in-place and reference-style.

    python bench/ttt_profile.py --preset qwen3-0.6b --device cuda --length 32768 --chunk 1024
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, Qwen3Config

from bench.ttt_forward import PRESETS, mode, run_once
from ttt_model import TTTConfig, enable_ttt
from ttt_model.model.state import ttt_layers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = Qwen3Config(**PRESETS[args.preset])
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    enable_ttt(model, TTTConfig(layers=args.layers, chunk_size=args.chunk))
    with torch.no_grad():
        for mlp in ttt_layers(model).values():
            mlp.ttt_conv.weight.normal_(0, 0.02)
    ids = torch.randint(0, config.vocab_size, (1, args.length), device=device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in ["off", "in-place", "reference-style"]:
        with mode(model, name):
            for _ in range(2):
                run_once(model, ids, device)
            with profile(activities=[activity]) as prof:
                run_once(model, ids, device)
        print(f"\n=== {name}, {args.length} tokens")
        print(prof.key_averages().table(sort_by=sort_key, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
