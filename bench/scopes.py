"""Adapted vs static loss of the shipped model per state scope and safeguard.

    python bench/scopes.py --documents 20 --max-tokens 8192

One DocumentReader per setting reads the same held-out documents in order, every document
shadow-evaluated with TTT off; prints token-weighted means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from pipeline.processing.actor_specs import standalone_reader_spec
from ttt_model.data import load_documents

SETTINGS = [
    ("per_document", "per_document", {}),
    ("global, none", "global", {}),
    ("global, max_delta_ratio 0.05", "global", {"max_delta_ratio": 0.05}),
    ("global, max_delta_ratio 0.2", "global", {"max_delta_ratio": 0.2}),
    ("global, decay 0.5", "global", {"decay": 0.5}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/ttt-tiny-qwen3")
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus/heldout.jsonl"))
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    docs = load_documents(args.corpus, limit=args.documents)
    rows = []
    for name, scope, ttt in SETTINGS:
        spec = standalone_reader_spec(args.model, scope=scope, ttt=ttt, base_loss_sample_rate=1.0,
                          max_document_tokens=args.max_tokens, spill_dir="/tmp/ttt-stream-bench-spill")
        reader = DocumentReader(spec, name="bench")
        adapted = base = tokens = 0.0
        for doc in docs:
            out = reader.process(DocumentTask(doc.id, doc.text))
            adapted += out.loss * out.tokens
            base += out.base_loss * out.tokens
            tokens += out.tokens
        rows.append({"setting": name, "adapted": adapted / tokens, "static": base / tokens,
                     "change": (adapted - base) / base, "tokens": int(tokens)})
        print(f"{name:32} adapted {adapted / tokens:.4f} static {base / tokens:.4f} "
              f"{100 * (adapted - base) / base:+.2f}%", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
