"""The demo (``bash infra/demo.sh``, the README's first command) under settings compared side by
side: runs alternate between them, the order reversed every other round, and each run's tokens/s,
sampled adapted-vs-static loss and the verdicts of its versions are parsed from what it prints.

    python -m bench.demo_settings topology --pairs 2 --out bench/results/demo_topology.json
    python -m bench.demo_settings gate-checks --pairs 2 --out bench/results/demo_gate_checks.json

- ``topology``: the demo's one device read by the synchronous learner (the embedded default: the
  learner reads and learns each document in one forward, on both cores) and by a reader beside the
  learner (a core each, the learner fed the hidden states below the adapters by the reader). Every
  document is learned in both.
- ``gate-checks``: the promotion gate and the admission checks on (the embedded default) and off.

A setting is a set of environment overrides (``TTT_STREAM__...``); ``DEMO_CORPUS``, ``DEMO_LIMIT``
and ``DEMO_IDLE_S`` in the environment change what the demo feeds (CI's smoke run: two documents of
the text shipped beside the model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
from pathlib import Path

COMPARISONS: dict[str, dict[str, dict[str, str]]] = {
    "topology": {
        "synchronous learner, 2 cores": {},
        "reader + learner, a core each": {"TTT_STREAM__PROCESSOR__LEARNER__SYNCHRONOUS": "false",
                                          "TTT_STREAM__PROCESSOR__LEARNER__NUM_CPUS": "1",
                                          "TTT_STREAM__PROCESSOR__READER_NUM_CPUS": "1"},
    },
    "gate-checks": {
        "on": {},
        "off": {"TTT_STREAM__PROCESSOR__LEARNER__GATE__ENABLED": "false",
                "TTT_STREAM__PROCESSOR__LEARNER__ADMISSION__ENABLED": "false"},
    },
}
# The figure the results page reads: the first setting's mean tokens/s over the second's.
RATIO_KEY = {"topology": "synchronous_over_reader_and_learner", "gate-checks": "on_over_off"}


def run_demo(setting: str, overrides: dict[str, str]) -> dict:
    """One run of the README's demo with ``overrides`` (environment), and its figures."""
    env = {**os.environ, "COLUMNS": "240", **overrides}
    out = subprocess.run(["bash", "infra/demo.sh"], env=env, capture_output=True, text=True, check=True).stdout

    def figure(label: str) -> str:
        match = re.search(rf"│ {re.escape(label)}\s*│\s*([^│]+?)\s*│", out)
        if match is None:
            raise RuntimeError(f"the demo printed no {label!r}:\n{out[-3000:]}")
        return match.group(1)

    verdicts = re.findall(r"│\s*\d+\s*│[^\n]*?│\s*(promoted|rejected|unjudged|none)\s*│", out)
    adapted = figure("adapted vs static")  # "-": no document of the run was sampled against the base
    return {"setting": setting, "documents": int(figure("documents")),
            "tokens_per_s": int(figure("tokens/s").replace(",", "")),
            "adapted_vs_static": None if adapted == "-" else float(adapted.rstrip("%")) / 100,
            "verdicts": verdicts[::-1]}


def alternate(settings: dict[str, dict[str, str]], pairs: int) -> list[dict]:
    """``pairs`` rounds of the demo under each setting (name -> environment overrides), the order
    reversed every other round so that neither always runs first."""
    names, runs = list(settings), []
    for pair in range(pairs):
        for setting in (names if pair % 2 == 0 else names[::-1]):
            run = {"order": len(runs) + 1, **run_demo(setting, settings[setting])}
            print(run, flush=True)
            runs.append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparison", choices=sorted(COMPARISONS))
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=None, help="a subset of the comparison's (a smoke run: one)")
    parser.add_argument("--machine", default="2 cores, 24 GiB (the development machine; CI's kind)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    settings = COMPARISONS[args.comparison]
    wanted = args.settings or list(settings)
    unknown = sorted(set(wanted) - set(settings))
    if unknown:
        raise SystemExit(f"--settings: no setting {unknown} in {args.comparison}; there are {list(settings)}")
    settings = {name: env for name, env in settings.items() if name in wanted}
    names, runs = list(settings), alternate(settings, args.pairs)
    mean = {s: sum(r["tokens_per_s"] for r in runs if r["setting"] == s) / args.pairs for s in names}
    result = {"command": f"python -m bench.demo_settings {args.comparison} (bash infra/demo.sh, alternating)",
              "machine": args.machine, "date": datetime.date.today().isoformat(), "mean_tokens_per_s": mean,
              "runs": runs}
    if len(names) == 2:
        result[RATIO_KEY[args.comparison]] = mean[names[0]] / mean[names[1]]
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
