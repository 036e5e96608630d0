"""Where a batched per_document read spends its time, by stage, against the static forward of
the same batch (CUDA events, stages interleaved, median of --reps).

    python bench/batched_breakdown.py --preset qwen3-0.6b --device cuda --dtype bfloat16 --batch 8 --length 2048
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from pipeline.processing.actor_specs import standalone_reader_spec
from bench.reader import static_score, text_of_length, write_model
from ttt_model import FastWeightState, ttt_forward
from ttt_model.model.patch import static_mode
from ttt_model.model.token_nll import token_nll, token_nll_plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 6, 12, 18, 24])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--cprofile", action="store_true", help="also: the host's time in one process_batch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    B, L = args.batch, args.length

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        write_model(args.preset, getattr(torch, args.dtype), args.chunk, args.layers, Path(tmp))
        reader = DocumentReader(standalone_reader_spec(model_path=tmp, device=args.device, dtype=args.dtype, scope="per_document",
                                           max_document_tokens=2 * L, batch_tokens=B * (L + args.chunk),
                                           tokenize_ahead=True), name="bench")
        model, tok = reader.model, reader.tokenizer
        gen = torch.Generator().manual_seed(1)
        texts = [text_of_length(tok, L, gen) for _ in range(B)]
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"][:L] for t in texts], device=device)
        n = torch.full((B,), ids.shape[1], device=device)
        C = args.chunk

        def forward(ttt: bool, all_logits: bool, nll=None) -> None:
            """One forward of the batch: TTT on (fresh fast weights per row) or off; the last
            position's logits only (prefill) or all of them, then optionally their token NLL."""
            mode = (ttt_forward(state=FastWeightState.for_model(model, batch_size=B), update_lengths=(n // C) * C)
                    if ttt else static_mode(model))
            with torch.no_grad(), mode:
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=0 if all_logits else 1).logits
                if nll is not None:
                    nll(logits[:, :-1], ids[:, 1:]).sum().item()

        batch_numbers = itertools.count()
        pending: list[list[DocumentTask]] = []

        def tokenize_next() -> None:  # as prepare() does ahead of each batch, outside the timing
            r = next(batch_numbers)
            pending.append([DocumentTask(f"r{r}-{i}", t) for i, t in enumerate(texts)])
            for t in pending[-1]:
                reader.prepare(t)

        def reader_batch() -> None:
            reader.process_batch(pending.pop())

        stages = {"static prefill": lambda: forward(False, False), "static logits": lambda: forward(False, True),
                  "static scorer (logits + fp32 CE)": lambda: static_score(model, ids).sum().item(),
                  "ttt prefill": lambda: forward(True, False), "ttt logits": lambda: forward(True, True),
                  "ttt logits + token_nll": lambda: forward(True, True, token_nll),
                  "ttt logits + token_nll, plain form": lambda: forward(True, True, token_nll_plain),
                  "reader process_batch": reader_batch}
        times = {k: [] for k in stages}
        for r in range(args.reps + 2):
            for k, fn in stages.items():
                if k == "reader process_batch":
                    tokenize_next()
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if r >= 2:
                    times[k].append(time.perf_counter() - start)
        rows = {k: 1000 * statistics.median(v) for k, v in times.items()}
        with torch.no_grad(), static_mode(model):  # the fused NLL against the plain form, real logits
            logits = model(input_ids=ids, use_cache=False).logits
            fused, plain = token_nll(logits[:, :-1], ids[:, 1:]), token_nll_plain(logits[:, :-1], ids[:, 1:])
            nll_error = {"max_abs": (fused.double() - plain.double()).abs().max().item(),
                         "mean_nll": plain.double().mean().item()}
            del logits
        print("fused vs plain token NLL:", nll_error)
        if args.cprofile:
            import cProfile
            import pstats

            tokenize_next()
            with cProfile.Profile() as prof:
                reader_batch()
                sync()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    for k, ms in rows.items():
        print(f"{k:36} {ms:8.1f} ms  {B * L / ms * 1000:9.0f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ms": rows, "fused_nll_vs_plain": nll_error}, indent=2))


if __name__ == "__main__":
    main()
