"""The demo on one device, read by the synchronous learner (the embedded default) and by a reader
beside a learner, side by side.

    python bench/demo_topology.py --pairs 2 --out bench/results/demo_topology.json

Runs ``bash infra/demo.sh`` (the README's first command) alternately with
``processor.learner.synchronous`` on (the learner reads and learns each document in one forward,
on both cores) and off (one reader and the learner on a core each, the learner fed the hidden
states below the adapters by the reader, ``lag`` 2), and records each run's tokens/s, sampled
adapted-vs-static loss and verdicts. Every document is learned in both.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from bench.demo_gate_checks import alternate, chosen

SETTINGS = {
    "synchronous learner, 2 cores": {},
    "reader + learner, a core each": {"TTT_STREAM__PROCESSOR__LEARNER__SYNCHRONOUS": "false",
                                      "TTT_STREAM__PROCESSOR__LEARNER__NUM_CPUS": "1",
                                      "TTT_STREAM__PROCESSOR__READER_NUM_CPUS": "1"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="which of them (a smoke run: one)")
    parser.add_argument("--machine", default="2 cores, 24 GiB (the development machine; CI's kind)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/demo_topology.json"))
    args = parser.parse_args()
    settings = chosen(SETTINGS, args.settings)
    names, runs = list(settings), alternate(settings, args.pairs)
    mean = {s: sum(r["tokens_per_s"] for r in runs if r["setting"] == s) / args.pairs for s in names}
    result = {"command": "python bench/demo_topology.py (bash infra/demo.sh, alternating)", "machine": args.machine,
              "date": datetime.date.today().isoformat(), "mean_tokens_per_s": mean, "runs": runs}
    if len(names) == 2:
        result["synchronous_over_reader_and_learner"] = mean[names[0]] / mean[names[1]]
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
