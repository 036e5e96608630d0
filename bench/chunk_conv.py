"""The chunk-restarted depthwise conv alone: the Triton kernel against the plain form.

Checks the compiled kernel against a float64 reference (the plain form on upcast inputs, itself
checked token by token in tests/ttt_model/test_chunk_conv.py) on fresh random inputs, then times
both with device events, interleaved, median of many.

    python bench/chunk_conv.py --tokens 4096 32768 --hidden 1024 --chunk 1024   # on a GPU

On CPU (``--device cpu``, with ``TRITON_INTERPRET=1``) the kernel runs in Triton's interpreter:
the check holds, the times say nothing of a GPU (CI's smoke run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

from bench.reader import timed as wall_timed

from ttt_model.model.chunk_conv import chunk_conv, chunk_conv_plain


def check(device: torch.device, dtype: torch.dtype, seed: int, d: int = 1000) -> float:
    """Relative error of the kernel against float64; ``d`` channels, not a multiple of its block."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, n, C, k = 2, 3, 96, 5
    t = torch.randn(B, n * C + 7, d, generator=g)[:, : n * C].to(device=device, dtype=dtype)
    taps = torch.randn(k, d, generator=g).to(device=device, dtype=dtype)
    out = chunk_conv(t, taps, C, fused=True)
    ref = chunk_conv_plain(t.double().cpu(), taps.double().cpu(), C)
    if not torch.isfinite(out).all():
        raise AssertionError("non-finite output: an element was not written")
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def timed(fn, device: torch.device) -> float:
    """Seconds of one call: device events on a GPU (a kernel of microseconds), else the wall clock."""
    if device.type != "cuda":
        return wall_timed(fn, device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--check-hidden", type=int, default=1000, help="channels of the correctness check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    errors = {str(dtype): max(check(device, dtype, seed, args.check_hidden) for seed in range(3))
              for dtype in (torch.float64, torch.float32, torch.bfloat16)}
    print("relative error vs float64:", json.dumps(errors))
    rows = []
    for tokens in args.tokens:
        sets = [(torch.randn(1, tokens, args.hidden, device=device, dtype=torch.bfloat16),
                 torch.randn(args.kernel, args.hidden, device=device, dtype=torch.bfloat16) * 0.02) for _ in range(4)]
        forms = {"plain": lambda t, w: chunk_conv_plain(t, w, args.chunk),
                 "fused": lambda t, w: chunk_conv(t, w, args.chunk, fused=True)}
        for fn in forms.values():
            for t, w in sets:
                fn(t, w)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = {name: [] for name in forms}
        for i in range(args.repeats):
            for name, fn in forms.items():  # interleaved; inputs rotated, so the cache holds none
                t, w = sets[i % len(sets)]
                times[name].append(timed(lambda: fn(t, w), device))
        median = {name: statistics.median(v) for name, v in times.items()}
        floor_bytes = 2 * tokens * args.hidden * 2  # read t once, write once (bf16)
        row = {"tokens": tokens, **{f"{n} us": median[n] * 1e6 for n in forms},
               "fused / plain": median["fused"] / median["plain"],
               "fused GB/s": floor_bytes / median["fused"] / 1e9}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(), "args": vars(args), "errors": errors, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
