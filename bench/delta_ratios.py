"""The fast weights' delta ratio (max over TTT layers of ||dW|| / ||W_down||) on documents read
the way the configured stream reads them: what `processor.monitor.max_fast_delta_ratio` is
measured against. What reads the stream (``bench.stream.direct_reading``: the embedded default's
synchronous learner, or one reader) reads the documents of a JSONL file in order; prints the
distribution and the largest documents.

    python -m bench.delta_ratios -c configs/local.yaml data/corpus/heldout.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from actors.call_types import DocumentTask
from bench.stream import direct_reading
from pipeline.config import load_config
from pipeline.processing.actor_specs import as_actors_see_it, reader_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/local.yaml")
    parser.add_argument("documents", type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = load_config(args.config)
    read, _ = direct_reading(config, reader_spec(as_actors_see_it(config)), "delta-ratios")
    rows = []
    with args.documents.open() as f:
        for i, line in enumerate(f):
            if args.limit is not None and i >= args.limit:
                break
            doc = json.loads(line)
            out = read(DocumentTask(doc.get("id", str(i)), doc["text"], key=doc.get("key")))
            rows.append({"id": out.id, "tokens": out.tokens, "delta_ratio": out.delta_ratio, "loss": out.loss})
            print(f"{i:4d} {out.id[:40]:40s} {out.tokens:7d} tokens  delta ratio {out.delta_ratio:.3f}", flush=True)
    ratios = sorted(r["delta_ratio"] for r in rows)
    q = statistics.quantiles(ratios, n=100) if len(ratios) > 1 else ratios * 99
    summary = {"documents": len(rows), "mean": statistics.fmean(ratios), "p50": q[49], "p90": q[89], "p99": q[98],
               "max": ratios[-1], "bound": config.processor.monitor.max_fast_delta_ratio,
               "above_bound": sum(r > (config.processor.monitor.max_fast_delta_ratio or float("inf")) for r in ratios)}
    print(json.dumps(summary, indent=2))
    for r in sorted(rows, key=lambda r: -r["delta_ratio"])[:8]:
        print(f"  {r['delta_ratio']:.3f}  {r['tokens']:7d} tokens  {r['id']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
