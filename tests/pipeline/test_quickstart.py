"""The quick start's command lines (docs/quickstart.md, "Step by step") run as they are written,
on a stack of their own that `up` starts and `down` stops (free ports and folders come from the
environment, the commands are the page's)."""

import os
import re
import subprocess
import uuid

import pytest

from tests.conftest import ROOT
from tests.conftest import free_port

pytestmark = [pytest.mark.slow]


def quickstart_lines() -> list[str]:
    page = (ROOT / "docs" / "quickstart.md").read_text()
    section = page.split("## Step by step", 1)[1].split("\n## ", 1)[0]
    return [line.strip().split("  #")[0].strip() for line in section.splitlines()
            if re.match(r"^    ttt-stream ", line)]


def test_the_quick_start_runs_as_written(tmp_path):
    lines = quickstart_lines()
    assert [line.split()[1] for line in lines] == ["up", "feed", "run", "status", "versions", "down"]
    broker, mlflow = free_port(), free_port()
    stream = f"quickstart-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTT_STREAM__")} | {
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", "COLUMNS": "120",
        "TTT_STREAM__KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{broker}",
        "TTT_STREAM__LOCAL_STACK__BROKER__PORT": str(broker),
        "TTT_STREAM__MLFLOW__TRACKING_URI": f"http://127.0.0.1:{mlflow}",
        "TTT_STREAM__LOCAL_STACK__MLFLOW__PORT": str(mlflow),
        "TTT_STREAM__LOCAL_STACK__DATA_DIR": str(tmp_path / "stack"),
        "TTT_STREAM__PROCESSOR__SPILL_DIR": str(tmp_path / "spill"),
        "TTT_STREAM__PROCESSOR__METRICS__PORT": "0",
        "TTT_STREAM__STREAM__NAME": stream, "TTT_STREAM__KAFKA__GROUP_ID": stream,
    }
    outputs, down = {}, lines[-1]
    try:
        for line in lines[:-1]:
            done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
            assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            outputs[line.split()[1]] = done.stdout
    finally:
        stopped = subprocess.run(["bash", "-c", down], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "sent 4 messages" in outputs["feed"]
    assert re.search(r"\bdocuments\W+4\b", outputs["run"]) and "adapted vs static" in outputs["run"]
    assert re.search(r"\blive\b", outputs["versions"])
