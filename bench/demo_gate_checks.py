"""The demo with the promotion gate and the admission checks on (the embedded default) and off.

    python bench/demo_gate_checks.py --pairs 2 --out bench/results/demo_gate_checks.json

Runs ``bash infra/demo.sh`` (the README's first command) alternately with
``processor.learner.gate`` and ``processor.learner.admission`` on and off (environment overrides),
on the same 40 documents, and records each run's tokens/s, sampled adapted-vs-static loss and the
verdicts of its versions, parsed from what the demo prints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
from pathlib import Path

OFF = {"TTT_STREAM__PROCESSOR__LEARNER__GATE__ENABLED": "false",
       "TTT_STREAM__PROCESSOR__LEARNER__ADMISSION__ENABLED": "false"}


def run_demo(setting: str, overrides: dict[str, str] | None = None) -> dict:
    """One run of the README's demo with ``overrides`` (environment; default: the gate and checks
    off for the setting "off"), and its figures."""
    overrides = overrides if overrides is not None else OFF if setting == "off" else {}
    env = {**os.environ, "COLUMNS": "240", **overrides}
    out = subprocess.run(["bash", "infra/demo.sh"], env=env, capture_output=True, text=True, check=True).stdout

    def figure(label: str) -> str:
        match = re.search(rf"│ {re.escape(label)}\s*│\s*([^│]+?)\s*│", out)
        if match is None:
            raise RuntimeError(f"the demo printed no {label!r}:\n{out[-3000:]}")
        return match.group(1)

    verdicts = re.findall(r"│\s*\d+\s*│[^\n]*?│\s*(promoted|rejected|unjudged|none)\s*│", out)
    return {"setting": setting, "documents": int(figure("documents")),
            "tokens_per_s": int(figure("tokens/s").replace(",", "")),
            "adapted_vs_static": float(figure("adapted vs static").rstrip("%")) / 100, "verdicts": verdicts[::-1]}


def chosen(settings: dict[str, dict[str, str]], wanted: list[str]) -> dict[str, dict[str, str]]:
    """The settings named in ``wanted``, in their own order."""
    unknown = sorted(set(wanted) - set(settings))
    if unknown:
        raise SystemExit(f"--settings: no setting {unknown}; there are {list(settings)}")
    return {name: env for name, env in settings.items() if name in wanted}


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
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=["on", "off"], help="which of on, off (a smoke run: one)")
    parser.add_argument("--machine", default="2 cores, 24 GiB (the development machine; CI's kind)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/demo_gate_checks.json"))
    args = parser.parse_args()
    runs = alternate(chosen({"on": {}, "off": OFF}, args.settings), args.pairs)
    result = {"command": "python bench/demo_gate_checks.py (bash infra/demo.sh, alternating)",
              "machine": args.machine, "date": datetime.date.today().isoformat(), "runs": runs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
