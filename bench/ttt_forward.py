"""Prefill throughput and peak memory: TTT off vs In-Place TTT vs a reference-style TTT form.

All three run on one model object with the same random weights and inputs, interleaved, in one
process, so their ratios are side by side. "reference-style" is a straight re-write of the
reference implementation's parallel form: nn.Conv1d over (d, C) chunks, one fast-weight matrix
per chunk, exclusive cumsum, then a batched product (kept here, not in the package, as the
baseline to beat).

    python bench/ttt_forward.py --preset small --device cpu                     # CPU table
    python bench/ttt_forward.py --preset qwen3-0.6b --device cuda --dtype bfloat16 \
        --lengths 4096 16384 32768 --chunk 1024                                # the H100 table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import weakref

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3Config

import ttt_model.model.layer as ttt_layer_module
from ttt_model import TTTConfig, enable_ttt
from ttt_model.model.chunk_conv import chunk_conv_plain, fused_kernel_available
from ttt_model.model.patch import static_mode
from ttt_model.model.state import ttt_layers

PRESETS = {
    # Qwen3-0.6B's shape, random weights.
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       rope_theta=1_000_000.0, max_position_embeddings=40960),
    # Small enough for a 2-core CPU.
    "small": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                  max_position_embeddings=40960),
}


def reference_style_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Parallel form with one weight matrix per chunk (what the issue calls reference-style)."""
    cfg = mlp.config
    B, T, d = x.shape
    C = cfg.chunk_size
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (B, T, D)
    n = -(-T // C)
    pad = n * C - T
    h_p = F.pad(h, (0, 0, 0, pad)).reshape(B, n, C, -1)
    t = F.pad(x, (0, 0, 0, pad)).reshape(B * n, C, d).transpose(1, 2)  # (B*n, d, C), as nn.Conv1d wants
    v = mlp.ttt_conv(t).transpose(1, 2)
    v = mlp.ttt_proj(v).reshape(B, n, C, d)
    dW = cfg.eta * torch.einsum("bncd,bncD->bndD", v, h_p)  # (B, n, d, D): one matrix per chunk  # (B, n, d, D): one matrix per chunk
    prefix = torch.cumsum(dW, dim=1) - dW  # exclusive prefix sum
    W = mlp.down_proj.weight + prefix  # (B, n, d, D)
    out = torch.einsum("bncD,bndD->bncd", h_p, W)
    return out.reshape(B, n * C, d)[:, :T]


@contextlib.contextmanager
def mode(model: torch.nn.Module, name: str):
    """Run the model with TTT off (original MLPs), in-place (ours), in-place with the plain
    (unfused) chunk conv, or reference-style."""
    if name == "off":
        with static_mode(model):
            yield
        return
    if name == "in-place plain conv":
        fused = ttt_layer_module.chunk_conv
        ttt_layer_module.chunk_conv = lambda t, taps, chunk: chunk_conv_plain(t, taps, chunk)
        try:
            yield
        finally:
            ttt_layer_module.chunk_conv = fused
        return
    mlps = ttt_layers(model) if name == "reference-style" else {}
    try:
        for mlp in mlps.values():
            mlp.forward = lambda x, m=mlp: reference_style_forward(m, x)
        yield
    finally:
        for mlp in mlps.values():
            del mlp.forward  # back to the class's forward


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensors created and still alive during a region (CPU memory figure)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[list, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = t.untyped_storage().data_ptr()
                refs, nbytes = self.storages.setdefault(key, ([], t.untyped_storage().nbytes()))
                refs.append(weakref.ref(t))
        live = 0
        for key in list(self.storages):
            refs, nbytes = self.storages[key]
            if any(r() is not None for r in refs):
                live += nbytes
            else:
                del self.storages[key]
        self.peak = max(self.peak, live)
        return out


def run_once(model, ids, device):
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(model, ids, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_once(model, ids, device)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    run_once(model, ids, device)
    return time.perf_counter() - t0


def peak_memory(model, ids, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run_once(model, ids, device)
        return torch.cuda.max_memory_allocated()
    tracker = LiveBytes()
    with tracker:
        run_once(model, ids, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return tracker.peak + weights


def add_model_arguments(parser: argparse.ArgumentParser, dtype: str, lengths: list[int], chunk: int) -> None:
    """The options of a bench on random weights of a preset's shape: preset, device, dtype,
    document lengths, TTT chunk and layers (with this bench's defaults)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths)
    parser.add_argument("--chunk", type=int, default=chunk)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="TTT layers (default every 6th)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, dtype="bfloat16", lengths=[1024, 4096], chunk=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = Qwen3Config(**PRESETS[args.preset])
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    enable_ttt(model, TTTConfig(layers=args.layers, chunk_size=args.chunk))
    with torch.no_grad():  # trained-looking TTT parameters: a zero conv would skip the updates
        for mlp in ttt_layers(model).values():
            mlp.ttt_conv.weight.normal_(0, 0.02)

    modes = ["off", "in-place", "reference-style"]
    if fused_kernel_available(next(model.parameters())):
        modes.insert(2, "in-place plain conv")  # the fused kernel's gain, side by side
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, length), device=device)
        with torch.inference_mode():  # correct first: the two TTT forms compute the same function
            last = {}
            for m in modes:
                with mode(model, m):
                    last[m] = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float()
        agreement = ((last["in-place"] - last["reference-style"]).norm() / last["reference-style"].norm()).item()
        moved = ((last["in-place"] - last["off"]).norm() / last["off"].norm()).item()
        times = {m: [] for m in modes}
        for m in modes:
            with mode(model, m):
                for _ in range(args.warmup):
                    run_once(model, ids, device)
        for _ in range(args.repeats):
            for m in modes:  # interleaved, so drift hits every mode alike
                with mode(model, m):
                    times[m].append(timed(model, ids, device))
        memory = {}
        for m in modes:
            with mode(model, m):
                memory[m] = peak_memory(model, ids, device)
        median = {m: statistics.median(times[m]) for m in modes}
        row = {
            "tokens": length,
            **{f"tok/s {m}": length / median[m] for m in modes},
            **{f"peak MiB {m}": memory[m] / 2**20 for m in modes},
            "throughput in-place/off": median["off"] / median["in-place"],
            "throughput reference-style/off": median["off"] / median["reference-style"],
            **({"throughput in-place plain conv/off": median["off"] / median["in-place plain conv"]}
               if "in-place plain conv" in modes else {}),
            "memory in-place/off": memory["in-place"] / memory["off"],
            "memory reference-style/off": memory["reference-style"] / memory["off"],
            "rel diff in-place vs reference-style": agreement,
            "rel diff in-place vs off": moved,
            "spread off (max/min)": max(times["off"]) / min(times["off"]),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{args.preset} {args.dtype} on {name}, chunk {args.chunk}, TTT layers "
          f"{sorted(ttt_layers(model))}, batch 1, prefill (logits_to_keep=1), median of {args.repeats}")
    header = ("tokens", "tok/s off", "tok/s in-place", "tok/s ref-style", "thr in-place", "thr plain conv",
              "thr ref-style", "mem in-place", "mem ref-style", "peak MiB off")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([
            str(r["tokens"]), f"{r['tok/s off']:.0f}", f"{r['tok/s in-place']:.0f}",
            f"{r['tok/s reference-style']:.0f}", f"{r['throughput in-place/off']:.3f}x",
            f"{r.get('throughput in-place plain conv/off', float('nan')):.3f}x",
            f"{r['throughput reference-style/off']:.3f}x", f"{r['memory in-place/off']:.3f}x",
            f"{r['memory reference-style/off']:.3f}x", f"{r['peak MiB off']:.0f}",
        ]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
