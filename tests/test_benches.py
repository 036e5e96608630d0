"""Every ``bench/*.py`` runs in a smoke mode: the tiny model or the small preset, a few short
documents, on CPU, seconds each. A bench that nothing runs rots between the runs that fill
``bench/results`` (``bench/stream.py`` once stopped under the embedded default and nobody saw);
here each one runs as its docstring says (``python -m bench.NAME``), writes what it writes, and
the test reads a figure of it back. A new bench must be given its smoke run here.

The demo bench runs ``infra/demo.sh`` (its own broker and MLflow, on the default ports) with one
setting, fed two documents of the text shipped beside the model."""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY_MODEL
from tests.sample_text import SAMPLE_TEXT

pytestmark = [pytest.mark.slow]

BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")


@dataclass(frozen=True)
class Smoke:
    """A bench's smoke run: its arguments (``{data}``, ``{corpus}``, ``{out}``, ``{config}`` filled
    in), its environment, and what it wrote that must hold a figure."""

    args: list[str]
    figure: Callable[[Path, str], float]  # (the --out file, stdout) -> a figure it measured
    env: dict[str, str] = field(default_factory=dict)
    stack: bool = False  # it reads the test session's broker
    # In a process of its own (as ``python -m bench.NAME``): it starts Ray or processes of its
    # own, or reads its environment at import. The others run in this one (``runpy``, the
    # same ``__main__``), which spares each of them the seconds of importing torch again.
    own_process: bool = False


def in_json(*path: str | int) -> Callable[[Path, str], float]:
    def figure(out: Path, stdout: str) -> float:
        value = json.loads(out.read_text())
        for key in path:
            value = value[key]
        return float(value)
    return figure


def in_stdout(pattern: str) -> Callable[[Path, str], float]:
    """The first number that ``pattern`` (a regex with one group) finds in what the bench printed."""
    def figure(out: Path, stdout: str) -> float:
        found = re.search(pattern, stdout)
        assert found, f"no {pattern!r} in:\n{stdout[-3000:]}"
        return float(found.group(1))
    return figure


TINY = ["--preset", "small", "--device", "cpu", "--dtype", "float32", "--chunk", "64"]
DEMO = {"DEMO_CORPUS": str(TINY_MODEL / "rehearsal.jsonl"), "DEMO_LIMIT": "2", "DEMO_IDLE_S": "2"}

SMOKE = {
    "adapter_reuse": Smoke(["--data", "{data}", "--warm", "2", "--new", "1", "--max-tokens", "256",
                            "--shipped-heldout", "{corpus}", "--device", "cpu", "--out", "{out}"],
                           in_json("keys", "shipped-new", "mean", "base")),
    "batched_breakdown": Smoke([*TINY, "--batch", "2", "--length", "256", "--layers", "0", "6", "--reps", "1",
                                "--json", "{out}"], in_json("fused_nll_vs_plain", "mean_nll")),
    "checkpoint_memory": Smoke(["--readers", "1", "--keys", "2", "--gather-keys", "1", "--state-mb", "0.01",
                                "--out", "{out}"], in_json("rows", 0, "checkpoint_s"), own_process=True),
    "chunk_conv": Smoke(["--device", "cpu", "--tokens", "256", "--hidden", "64", "--chunk", "64", "--repeats", "2",
                         "--check-hidden", "40", "--json", "{out}"], in_json("errors", "torch.float32"),
                        env={"TRITON_INTERPRET": "1"}, own_process=True),
    "context_parallel": Smoke([*TINY, "--length", "512", "--ranks", "1", "2", "--repeats", "1", "--warmup", "0",
                               "--out", "{out}"], in_json("rows", 1, "last_logits_rel_err_vs_1_rank"), own_process=True),
    "delta_ratios": Smoke(["-c", "configs/local.yaml", "{corpus}", "--limit", "2", "--json", "{out}"],
                          in_json("summary", "max")),
    "demo_settings": Smoke(["topology", "--pairs", "1", "--settings", "reader + learner, a core each", "--out", "{out}"],
                           in_json("runs", 0, "tokens_per_s"), env=DEMO),
    "domain_stream": Smoke(["--data", "{data}", "--max-tokens", "256", "--documents", "3", "--heldout-documents", "2",
                            "--shipped-heldout", "{corpus}", "--shipped-documents", "2", "--settings", "fast,slow",
                            "--device", "cpu", "--out", "{out}"], in_json("tokens_per_s", "slow")),
    "learning_admission": Smoke(["--data", "{data}", "--max-tokens", "256", "--documents", "6", "--heldout-documents",
                                 "2", "--shipped-documents", "2", "--shipped-heldout", "{corpus}", "--every", "1",
                                 "--checkpoint-every", "3", "--settings", "poisoned:on", "--out", "{out}"],
                                in_json("settings", "poisoned:on", "heldout_gain")),
    "reader": Smoke([*TINY, "--lengths", "256", "--documents", "2", "--warmup", "1", "--json", "{out}"],
                    in_json("rows", 0, "worker / static")),
    "shared_device": Smoke([*TINY, "--lengths", "256", "--documents", "2", "--json", "{out}"],
                           in_json("rows", 0, "shared / static"), own_process=True),
    "scopes": Smoke(["--corpus", "{corpus}", "--documents", "2", "--max-tokens", "256", "--out", "{out}"],
                    in_json(0, "adapted")),
    "stream": Smoke(["-c", "{config}", "--corpus", "{corpus}", "--documents", "2", "--max-tokens", "256",
                     "--threads", "1", "--out", "{out}"], in_json("pipeline_tokens_per_s"), stack=True,
                     own_process=True),
    "summarize_compare": Smoke(["{data}/compare"], in_stdout(r"past 2k: base static \[([\d.]+)")),
    "ttt_forward": Smoke([*TINY, "--lengths", "256", "--repeats", "1", "--warmup", "0", "--json", "{out}"],
                         in_json("rows", 0, "throughput in-place/off")),
    "ttt_mlp": Smoke(["--device", "cpu", "--dtype", "float32", "--hidden", "64", "--intermediate", "128", "--chunk",
                      "64", "--lengths", "256", "--repeats", "2", "--top", "3"], in_stdout(r"TTT MLP ([\d.]+) us")),
    "ttt_profile": Smoke([*TINY, "--length", "256", "--top", "3"], in_stdout(r"Self CPU time total: ([\d.]+)")),
}


def test_every_bench_has_a_smoke_run():
    assert sorted(SMOKE) == BENCHES


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    """Documents cut from the tests' sample text: a shipped-style corpus, two domains as
    ``pipeline.local.corpus.build_domain`` lays them out, and ``ttt_model.training.evaluate``'s output for
    ``bench/summarize_compare.py`` (one run of the tiny model, as its base and its TTT side)."""
    root = tmp_path_factory.mktemp("bench-smoke")
    pieces = [SAMPLE_TEXT[i:i + 2500] for i in range(0, 30000, 2500)]

    def write(path: Path, texts: list[str], prefix: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"id": f"{prefix}-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))

    write(root / "corpus.jsonl", pieces[:4], "shipped")
    for domain, texts in (("pandas", pieces[4:8]), ("sphinx", pieces[8:12])):
        write(root / domain / "stream.jsonl", texts[:3], f"{domain}")
        write(root / domain / "heldout.jsonl", texts[3:], f"{domain}-heldout")
    write(root / "long.jsonl", [SAMPLE_TEXT], "long")  # past 2k tokens, where the summary pools
    evaluated = subprocess.run(
        [sys.executable, "-m", "ttt_model.training.evaluate", "--model", str(TINY_MODEL), "--documents", str(root / "long.jsonl"),
         "--max-tokens", "2560", "--modes", "static", "in_place", "--out", str(root / "compare" / "ttt0")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (root / "compare" / "base0").mkdir()
    (root / "compare" / "base0" / "eval.json").write_text((root / "compare" / "ttt0" / "eval.json").read_text())
    return root


@pytest.mark.parametrize("name", BENCHES)
def test_the_bench_runs_in_its_smoke_mode(name, smoke_data, tmp_path, request, monkeypatch, capsys):
    smoke = SMOKE[name]
    config = tmp_path / "config.yaml"
    if smoke.stack:
        config.write_text(yaml.safe_dump(request.getfixturevalue("stack").model_dump(mode="json")))
    out = tmp_path / f"{name}.json"
    args = [a.format(data=smoke_data, corpus=smoke_data / "corpus.jsonl", out=out, config=config) for a in smoke.args]
    env = {"COLUMNS": "240", **smoke.env}
    if smoke.own_process:
        ran = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("TTT_STREAM__")} | env,
                             timeout=480)
        assert ran.returncode == 0, f"{ran.stdout[-2000:]}\n{ran.stderr[-4000:]}"
        printed = ran.stdout
    else:
        for key in [k for k in os.environ if k.startswith("TTT_STREAM__")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", *args])
        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        try:  # a reader built with deterministic settings sets them for the whole process
            runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
        printed = capsys.readouterr().out
    assert math.isfinite(smoke.figure(out, printed))
