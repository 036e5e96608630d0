"""Summarise bench/ttt_vs_base.sh: TTT-trained vs no-TTT models, and the gradient objective.

    python bench/summarize_compare.py runs/compare/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PAST_2K = ("2048-8192", "8192+")


def pooled(result: dict, mode: str, buckets=PAST_2K) -> float:
    rows = [result["buckets"][b] for b in buckets if b in result["buckets"]]
    return sum(r[mode] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)


def main(results: Path) -> None:
    runs = {p.name: json.loads((p / "eval.json").read_text()) for p in sorted(results.iterdir()) if (p / "eval.json").exists()}
    seeds = sorted({name[-1] for name in runs if name[:-1] in ("ttt", "base")})
    print("bucket | " + " | ".join(f"base{s} static | ttt{s} in-place | gain s{s}" for s in seeds))
    for bucket in list(runs[f"base{seeds[0]}"]["buckets"]) + ["past 2k"]:
        cells = [bucket]
        for s in seeds:
            keys = PAST_2K if bucket == "past 2k" else (bucket,)
            base, ttt = pooled(runs[f"base{s}"], "static", keys), pooled(runs[f"ttt{s}"], "in_place", keys)
            cells += [f"{base:.4f}", f"{ttt:.4f}", f"{100 * (1 - ttt / base):+.2f}%"]
        print(" | ".join(cells))
    base = [pooled(runs[f"base{s}"], "static") for s in seeds]
    ttt = [pooled(runs[f"ttt{s}"], "in_place") for s in seeds]
    print(f"past 2k: base static {base} (seed spread {100 * (max(base) - min(base)) / min(base):.2f}%), "
          f"ttt in-place {ttt} (seed spread {100 * (max(ttt) - min(ttt)) / min(ttt):.2f}%); "
          f"worst TTT seed vs best base seed: {100 * (1 - max(ttt) / min(base)):+.2f}%")
    print("\ngradient objective vs static, past 2k:")
    for name, result in runs.items():
        if "gradient" in result["modes"]:
            g = result["gradient_config"]
            print(f"  {name}: lr {g['gradient_lr']} {g['gradient_optimizer']}, max_delta_ratio {g['max_delta_ratio']}: "
                  f"{100 * (1 - pooled(result, 'gradient') / pooled(result, 'static')):+.2f}%")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
