"""What a stream teaches the model: a domain the shipped model never saw, read as a stream.

    python bench/domain_stream.py --domain pandas            # or sphinx; builds data/domains/<domain>
    python bench/domain_stream.py --domain pandas --slow lr=3e-3 --slow rank=16

The domain's documents (a Debian documentation package, split by a hash of their id) are cut to
``--max-tokens`` and read in a fixed shuffled order by one DocumentReader per setting:

- fast only: In-Place TTT, fast weights reset at every document (per_document scope);
- slow only: slow weights learned across documents, no fast weights (eta 0);
- slow + fast: both (the embedded default);
- static: the base model with TTT off (the shadow evaluation of the fast-only reader).

Reported: prequential stream loss by tenth of the stream per setting, and after the stream the
loss on the domain's held-out documents and on the shipped held-out corpus (forgetting) for the
base model and for the final slow + fast state, static (slow weights merged, TTT off) and with
per-document fast weights on top. Token-weighted means; ``--out`` writes JSON and a PNG plot;
``--mlflow-uri`` logs both to an MLflow run.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from actors.call_types import DocumentTask, ReaderSpec
from actors.document_reader import DocumentReader
from pipeline.processing.actor_specs import standalone_reader_spec
from ttt_model.adapted_state import AdaptedState
from ttt_model.data import Document, load_documents
from ttt_model.model.patch import static_mode
from ttt_model.model.session import TTTSession


def prepare(path: Path, tokenizer, max_tokens: int, limit: int | None, seed: int) -> list[Document]:
    """Documents of ``path`` cut to ``max_tokens`` tokens, shuffled by ``seed`` (None: file order)."""
    docs = load_documents(path)
    if seed >= 0:
        random.Random(seed).shuffle(docs)
    docs = docs[:limit] if limit else docs
    out = []
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"][:max_tokens]
        out.append(Document(doc.id, tokenizer.decode(ids), doc.source))
    return out


def read_stream(spec: ReaderSpec, docs: list[Document]) -> tuple[DocumentReader, list[dict]]:
    reader = DocumentReader(spec, name="bench")
    rows = []
    for doc in docs:
        out = reader.process(DocumentTask(doc.id, doc.text))
        rows.append({"id": doc.id, "tokens": out.tokens, "loss": out.loss, "base_loss": out.base_loss,
                     "latency_s": out.latency_ms / 1000, "slow_delta_ratio": out.slow_delta_ratio})
    return reader, rows


@torch.no_grad()
def evaluate(reader: DocumentReader, state: AdaptedState | None, docs: list[Document], fast: bool) -> float:
    """Token-weighted loss of ``docs`` under ``state``'s slow weights (None: base), with fresh fast
    weights per document or TTT off; nothing is learned."""
    total = tokens = 0.0
    slow = reader.slow.bound(state.slow) if reader.slow is not None and state is not None else nullcontext()
    off = reader.slow.disabled() if reader.slow is not None and state is None else nullcontext()
    with slow, off:
        for doc in docs:
            ids = torch.tensor(reader.tokenizer(doc.text, add_special_tokens=False)["input_ids"], device=reader.device)[None]
            if fast:
                nll = TTTSession(reader.model).feed(ids).nll[0, 1:]
            else:
                with static_mode(reader.model):
                    logits = reader.model(input_ids=ids).logits[0, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float(nll.double().sum())
            tokens += nll.numel()
    return total / tokens


def by_tenth(rows: list[dict], key: str) -> list[float]:
    n = len(rows)
    parts = [rows[i * n // 10 : (i + 1) * n // 10] for i in range(10)]
    return [sum(r[key] * r["tokens"] for r in p) / sum(r["tokens"] for r in p) for p in parts if p]


def weighted(rows: list[dict], key: str) -> float:
    return sum(r[key] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in result["stream_by_tenth"].items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set_xlabel("tenth of the stream")
    ax.set_ylabel("prequential loss (nats/token)")
    ax.set_title(f"{result['domain']}: {result['documents']} documents x <= {result['max_tokens']} tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs, values as YAML scalars (``1e-3`` too, which YAML 1.1 reads as text)."""
    def value(text: str):
        try:
            return float(text) if "e" in text.lower() and not text.isalpha() else yaml.safe_load(text)
        except ValueError:
            return yaml.safe_load(text)

    return {k: value(v) for k, v in (p.split("=", 1) for p in pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="pandas")
    parser.add_argument("--data", type=Path, default=Path("data/domains"))
    parser.add_argument("--config", type=Path, default=Path("configs/local.yaml"),
                        help="model and slow-weight settings are read from this config (the embedded default)")
    parser.add_argument("--slow", action="append", default=[], help="override a model.slow field: key=value")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--documents", type=int, default=None)
    parser.add_argument("--heldout-documents", type=int, default=None)
    parser.add_argument("--shipped-heldout", type=Path, default=Path("data/corpus/heldout.jsonl"))
    parser.add_argument("--shipped-documents", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="order of the stream")
    parser.add_argument("--settings", default="fast,slow,slow+fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mlflow-uri", default=None)
    args = parser.parse_args()

    # The model section as written; the spec validates its TTT and slow fields.
    model = (yaml.safe_load(args.config.read_text()) or {}).get("model", {})
    root = args.data / args.domain
    if not (root / "stream.jsonl").exists():
        from pipeline.local.corpus import DOMAINS, build_domain

        build_domain(DOMAINS[args.domain], root)
    slow = {**(model.get("slow") or {}), **parse_overrides(args.slow), "enabled": True}
    ttt = dict(model.get("ttt") or {})
    model_path = model.get("path", "models/ttt-tiny-qwen3")
    base = dict(model_path=model_path, device=args.device, max_document_tokens=args.max_tokens,
                spill_dir="/tmp/ttt-stream-bench-spill", deterministic=False)
    settings = {
        "fast": standalone_reader_spec(**base, scope="per_document", ttt=ttt, base_loss_sample_rate=1.0),
        "slow": standalone_reader_spec(**base, scope="global", ttt={**ttt, "eta": 0.0}, slow=slow, base_loss_sample_rate=0.0),
        "slow+fast": standalone_reader_spec(**base, scope="global", ttt=ttt, slow=slow, base_loss_sample_rate=0.0),
    }
    chosen = args.settings.split(",")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    stream = prepare(root / "stream.jsonl", tokenizer, args.max_tokens, args.documents, args.seed)
    heldout = prepare(root / "heldout.jsonl", tokenizer, args.max_tokens, args.heldout_documents, -1)
    shipped = (prepare(args.shipped_heldout, tokenizer, args.max_tokens, args.shipped_documents, -1)
               if args.shipped_heldout.exists() else [])
    result = {"domain": args.domain, "documents": len(stream), "heldout_documents": len(heldout),
              "shipped_documents": len(shipped), "max_tokens": args.max_tokens, "seed": args.seed, "slow": slow,
              "ttt": ttt, "stream_by_tenth": {}, "stream_loss": {}, "last_quarter": {}, "tokens_per_s": {}}
    readers = {}
    for name in chosen:
        started = time.perf_counter()
        reader, rows = read_stream(settings[name], stream)
        readers[name] = reader
        busy = sum(r["latency_s"] for r in rows)
        tokens = sum(r["tokens"] for r in rows)
        result["tokens_per_s"][name] = tokens / busy
        if name == "fast":
            result["stream_by_tenth"]["static"] = by_tenth(rows, "base_loss")
            result["stream_loss"]["static"] = weighted(rows, "base_loss")
            result["last_quarter"]["static"] = weighted(rows[3 * len(rows) // 4 :], "base_loss")
        result["stream_by_tenth"][name] = by_tenth(rows, "loss")
        result["stream_loss"][name] = weighted(rows, "loss")
        result["last_quarter"][name] = weighted(rows[3 * len(rows) // 4 :], "loss")
        print(f"{name:10} stream {result['stream_loss'][name]:.4f}  last quarter {result['last_quarter'][name]:.4f}  "
              f"{result['tokens_per_s'][name]:.0f} tok/s  ({time.perf_counter() - started:.0f} s)", flush=True)
        if name == "slow+fast":
            result["final_slow_delta_ratio"] = rows[-1]["slow_delta_ratio"]

    if "slow+fast" in readers:
        reader = readers["slow+fast"]
        (live,) = [s.state for s in reader.mode.states._live.values()]
        evals = {}
        for label, docs in (("domain_heldout", heldout), ("shipped_heldout", shipped)):
            if not docs:
                continue
            evals[label] = {
                "base_static": evaluate(reader, None, docs, fast=False),
                "base_fast": evaluate(reader, None, docs, fast=True),
                "live_static": evaluate(reader, live, docs, fast=False),
                "live_fast": evaluate(reader, live, docs, fast=True),
            }
            e = evals[label]
            print(f"{label:16} base {e['base_static']:.4f} (fast {e['base_fast']:.4f})  live {e['live_static']:.4f} "
                  f"({100 * (e['live_static'] / e['base_static'] - 1):+.2f}%)  live+fast {e['live_fast']:.4f} "
                  f"({100 * (e['live_fast'] / e['base_fast'] - 1):+.2f}% vs base+fast)", flush=True)
        result["heldout"] = evals
    if "fast" in result["last_quarter"] and "slow+fast" in result["last_quarter"]:
        gain = result["last_quarter"]["slow+fast"] / result["last_quarter"]["fast"] - 1
        result["last_quarter_slow_fast_vs_fast"] = gain
        print(f"last quarter, slow+fast vs fast only: {100 * gain:+.2f}%")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        plot(result, args.out.with_suffix(".png"))
    if args.mlflow_uri and args.out:
        import mlflow

        mlflow.set_tracking_uri(args.mlflow_uri)
        mlflow.set_experiment("ttt-stream-bench")
        with mlflow.start_run(run_name=f"domain-stream-{args.domain}-seed{args.seed}"):
            mlflow.log_params({f"slow.{k}": v for k, v in slow.items()} | {"domain": args.domain, "seed": args.seed})
            for name, curve in result["stream_by_tenth"].items():
                for i, value in enumerate(curve):
                    mlflow.log_metric(f"stream_loss.{name.replace('+', '_')}", value, step=i + 1)
            mlflow.log_artifact(str(args.out))
            mlflow.log_artifact(str(args.out.with_suffix(".png")))


if __name__ == "__main__":
    main()
