"""Held-out loss by token position: the static model, In-Place TTT, and the gradient objective.

    python -m ttt_model.training.evaluate --model runs/ttt-s0/final --data data/prepared --out runs/ttt-s0/eval

Every held-out document (truncated at ``--max-tokens``) is read once per mode; the per-token
negative log-likelihood is averaged within position buckets (0-512, 512-2k, 2k-8k, 8k+) over
all documents. Writes ``eval.json``, ``loss_by_position.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

import torch

from ttt_model.config import TTTConfig
from ttt_model.model.patch import disable_ttt, enable_ttt, has_ttt, load_ttt_model, static_mode
from ttt_model.model.session import TTTSession
from ttt_model.model.state import ttt_layers
from ttt_model.data import load_documents
from ttt_model.training.train import load_prepared, load_tokenizer

log = logging.getLogger(__name__)

BUCKETS = ((0, 512), (512, 2048), (2048, 8192), (8192, None))
PLOT_BIN = 256


def bucket_name(lo: int, hi: int | None) -> str:
    return f"{lo}-{hi}" if hi is not None else f"{lo}+"


@contextlib.contextmanager
def gradient_mode(model, gradient: TTTConfig):
    """Dynamic evaluation on the model's TTT layers (or ``gradient.layers`` if it has none)."""
    if not has_ttt(model):
        enable_ttt(model, gradient)
        try:
            yield model
        finally:
            disable_ttt(model)
        return
    mlps = ttt_layers(model)
    saved = {idx: mlp.config for idx, mlp in mlps.items()}
    config = gradient.model_copy(update={"layers": list(mlps)})
    try:
        for mlp in mlps.values():
            mlp.config = config
        yield model
    finally:
        for idx, mlp in mlps.items():
            mlp.config = saved[idx]


def mode_context(model, mode: str, gradient: TTTConfig):
    """The model as ``mode`` reads: static (TTT off), in_place (as trained), or gradient."""
    if mode == "static":
        return static_mode(model)
    if mode == "gradient":
        return gradient_mode(model, gradient)
    return contextlib.nullcontext(model)


def token_nll(model, ids: torch.Tensor, mode: str, chunk: int) -> torch.Tensor:
    """Per-token NLL (length L-1, predicting tokens 1..L-1) of one document, inside ``mode_context``."""
    if mode == "gradient":
        session = TTTSession(model)
        nll = torch.cat([session.feed(ids[:, i : i + chunk]).nll for i in range(0, ids.shape[1], chunk)], 1)
        return nll[0, 1:]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")


def evaluate(model, docs: list[torch.Tensor], modes: list[str], gradient: TTTConfig, max_tokens: int,
             device: str) -> dict:
    model.to(device).eval()
    docs = [torch.as_tensor(doc[:max_tokens], device=device)[None] for doc in docs]
    docs = [ids for ids in docs if ids.shape[1] >= 2]
    sums = {m: torch.zeros(max_tokens, dtype=torch.float64) for m in modes}
    counts = torch.zeros(max_tokens, dtype=torch.float64)
    for ids in docs:
        counts[1 : ids.shape[1]] += 1  # position p = index of the predicted token
    for m in modes:
        with mode_context(model, m, gradient):  # entered once per mode, not once per document
            for ids in docs:
                sums[m][1 : ids.shape[1]] += token_nll(model, ids, m, gradient.chunk_size).double().cpu()
    result = {"documents": len(docs), "max_tokens": max_tokens, "buckets": {}, "curve": {}}
    for lo, hi in BUCKETS:
        sl = slice(lo, hi if hi is not None else max_tokens)
        tokens = counts[sl].sum().item()
        if tokens == 0:
            continue
        result["buckets"][bucket_name(lo, hi)] = {
            "tokens": int(tokens), **{m: (sums[m][sl].sum() / tokens).item() for m in modes}
        }
    for m in modes:
        curve = []
        for start in range(0, max_tokens, PLOT_BIN):
            c = counts[start : start + PLOT_BIN].sum().item()
            if c:
                curve.append((start + PLOT_BIN / 2, (sums[m][start : start + PLOT_BIN].sum() / c).item()))
        result["curve"][m] = curve
    return result


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, curve in result["curve"].items():
        ax.plot([x for x, _ in curve], [y for _, y in curve], label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("token position in document")
    ax.set_ylabel(f"held-out loss (nats, mean over {PLOT_BIN}-token bins)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict) -> str:
    modes = [m for m in ("static", "in_place", "gradient") if m in next(iter(result["buckets"].values()))]
    lines = ["positions | tokens | " + " | ".join(modes) + " | " + " | ".join(f"{m} vs static" for m in modes[1:])]
    for name, row in result["buckets"].items():
        cells = [name, str(row["tokens"])] + [f"{row[m]:.4f}" for m in modes]
        cells += [f"{100 * (row[m] - row['static']) / row['static']:+.2f}%" for m in modes[1:]]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttt-stream eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, default=None, help="prepared dir (token ids from `train prepare`)")
    source.add_argument("--documents", type=Path, default=None,
                        help="JSONL documents, tokenized with the model's own tokenizer")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--min-tokens", type=int, default=0, help="skip held-out documents shorter than this")
    parser.add_argument("--limit", type=int, default=None, help="at most this many documents")
    parser.add_argument("--modes", nargs="+", default=None, choices=["static", "in_place", "gradient"])
    ttt = TTTConfig()  # the flags' defaults: one source of truth
    parser.add_argument("--gradient-lr", type=float, default=ttt.gradient_lr)
    parser.add_argument("--gradient-steps", type=int, default=ttt.gradient_steps)
    parser.add_argument("--gradient-optimizer", choices=["sgd", "adam"], default=ttt.gradient_optimizer)
    parser.add_argument("--gradient-layers", type=int, nargs="+", default=ttt.layers)
    parser.add_argument("--gradient-chunk", type=int, default=ttt.chunk_size)
    parser.add_argument("--max-delta-ratio", type=float, default=ttt.max_delta_ratio,
                        help="safeguard on the gradient objective")
    parser.add_argument("--max-update-norm", type=float, default=ttt.max_update_norm)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dtype = torch.float32 if args.device == "cpu" else None  # bf16 checkpoints compute in fp32 on CPU
    model = load_ttt_model(args.model, **({"dtype": dtype} if dtype else {}))
    modes = args.modes or (["static", "in_place", "gradient"] if has_ttt(model) else ["static", "gradient"])
    gradient = TTTConfig(
        layers=args.gradient_layers, chunk_size=args.gradient_chunk, objective="gradient",
        gradient_lr=args.gradient_lr, gradient_steps=args.gradient_steps,
        gradient_optimizer=args.gradient_optimizer, max_delta_ratio=args.max_delta_ratio,
        max_update_norm=args.max_update_norm,
    )
    if args.documents is not None:
        tokenizer = load_tokenizer(args.model)
        texts = [d.text for d in load_documents(args.documents)]
        all_docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        all_docs = load_prepared(args.data or Path("data/prepared"), "heldout")
    docs = [d for d in all_docs if len(d) >= args.min_tokens][: args.limit]
    result = evaluate(model, docs, modes, gradient, args.max_tokens, args.device)
    result.update({"model": str(args.model), "modes": modes, "gradient_config": gradient.model_dump()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "loss_by_position.png", f"{args.model} on {len(docs)} held-out documents")
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
