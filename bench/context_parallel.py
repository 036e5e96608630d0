"""Latency of one long document on 1, 2, 4 ranks (context parallelism), communication apart.

    python -m bench.context_parallel --preset small --length 16384 --ranks 1 2 --device cpu
    python -m bench.context_parallel --preset qwen3-0.6b --length 65536 --ranks 1 2 --device cuda --dtype bfloat16

Ranks are processes joined by torch.distributed (gloo on CPU, nccl on GPU, one GPU each),
started with torch.multiprocessing, each holding the same random-weight model (Qwen3 shape,
TTT on layers 0/6/12/...). 1 rank is the plain single-process forward. Each rank computes its
segment's last logits only (as a prefill would), the streaming state is kept. The latency of a
run is the slowest rank's; the communication time is the time inside the collectives (all-gather
of keys/values, TTT halo rows and chunk sums) on that rank. Median over --repeats after --warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.ttt_forward import PRESETS


def build(preset: str, device: torch.device, dtype: torch.dtype, chunk: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from ttt_model import TTTConfig, enable_ttt
    from ttt_model.model.state import ttt_layers

    torch.manual_seed(0)
    config = Qwen3Config(**PRESETS[preset])
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    enable_ttt(model, TTTConfig(chunk_size=chunk))
    with torch.no_grad():
        for mlp in ttt_layers(model).values():
            mlp.ttt_conv.weight.normal_(0, 0.02)
    return model, config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def single(args) -> dict:
    from ttt_model import FastWeightState, ttt_forward

    device = torch.device(args.device if args.device == "cpu" else "cuda:0")
    torch.set_num_threads(args.threads)
    model, config = build(args.preset, device, getattr(torch, args.dtype), args.chunk)
    ids = torch.randint(0, config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1)).to(device)
    times = []
    for i in range(args.warmup + args.repeats):
        state = FastWeightState.for_model(model)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad(), ttt_forward(state=state):
            last = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    from safetensors.torch import save_file

    save_file({"last": last.cpu().contiguous()}, str(args.reference))  # the ranks compare against it
    return {"ranks": 1, "seconds": statistics.median(times), "communication_seconds": 0.0}


def rank_main(rank: int, world: int, port: int, args, out) -> None:
    from ttt_model.parallel import CommunicationTimer, ContextParallelGroup, context_parallel_forward, split_lengths
    from ttt_model.model.state import FastWeightState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cpu" if args.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank, world_size=world)
    try:
        model, config = build(args.preset, device, getattr(torch, args.dtype), args.chunk)
        ids = torch.randint(0, config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1))
        lengths = split_lengths(args.length, world, args.attention_weight)
        s = sum(lengths[:rank])
        segment = ids[:, s : s + lengths[rank]].to(device)
        rows = []
        for i in range(args.warmup + args.repeats):
            timer = CommunicationTimer()
            cp = ContextParallelGroup(rank, lengths, timer=timer)
            state = FastWeightState.for_model(model)
            dist.barrier()
            sync(device)
            start = time.perf_counter()
            logits = context_parallel_forward(model, segment, cp, state, logits_to_keep=1)
            sync(device)
            elapsed = torch.tensor([time.perf_counter() - start, timer.seconds], dtype=torch.float64)
            gathered = [torch.zeros_like(elapsed) for _ in range(world)]
            dist.all_gather_object(gathered, elapsed)
            if i >= args.warmup:
                slowest = max(gathered, key=lambda t: t[0])
                rows.append((float(slowest[0]), float(slowest[1]), [[round(float(v), 4) for v in t] for t in gathered]))
        if args.profile and rank == world - 1:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                context_parallel_forward(model, segment, ContextParallelGroup(rank, lengths), FastWeightState.for_model(model),
                                         logits_to_keep=1)
                sync(device)
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)
        elif args.profile:
            context_parallel_forward(model, segment, ContextParallelGroup(rank, lengths), FastWeightState.for_model(model),
                                     logits_to_keep=1)
        if rank == world - 1 and args.reference.exists():
            from safetensors.torch import load_file

            want = load_file(str(args.reference))["last"]
            out["last_logits_rel_err"] = float((logits[:, -1].float().cpu() - want).norm() / want.norm())
        dist.barrier()
        if rank == 0:
            out["result"] = {"ranks": world, "lengths": list(lengths), "seconds": statistics.median(r[0] for r in rows),
                             "communication_seconds": statistics.median(r[1] for r in rows),
                             "per_rank_seconds_and_communication": rows[len(rows) // 2][2]}
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--attention-weight", type=float, default=0.0,
                        help="split_lengths' attention_weight (0: equal lengths; see its docstring)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print the last rank's top kernels of one forward")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import tempfile

    args.reference = Path(tempfile.mkdtemp()) / "single_last_logits.safetensors"
    rows = []
    for world in args.ranks:
        if world == 1:
            row = single(args)
        else:
            out = mp.Manager().dict()
            mp.spawn(rank_main, args=(world, free_port(), args, out), nprocs=world, join=True)
            row = dict(out["result"]) | {"last_logits_rel_err_vs_1_rank": out.get("last_logits_rel_err")}
        rows.append(row)
        base = rows[0]["seconds"]
        print(f"{world} rank(s): {row['seconds']:.3f} s  (communication {row['communication_seconds']:.3f} s, "
              f"compute {row['seconds'] - row['communication_seconds']:.3f} s)  speed-up {base / row['seconds']:.2f}x"
              f"  lengths {row.get('lengths', [args.length])}  last-logits rel err vs 1 rank "
              f"{row.get('last_logits_rel_err_vs_1_rank')}  per rank {row.get('per_rank_seconds_and_communication')}",
              flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
