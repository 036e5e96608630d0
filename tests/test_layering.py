"""The floors of the code base: ttt_model (the method) < actors (hosting models) < pipeline (the
stream, the CLI). No module imports from a floor above its own, at the top or inside a function."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import ROOT

FLOORS = ["ttt_model", "actors", "pipeline"]


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("floor", FLOORS)
def test_no_module_imports_from_a_floor_above(floor):
    above = set(FLOORS[FLOORS.index(floor) + 1:])
    offenders = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & above)
                 for path in sorted((ROOT / floor).rglob("*.py"))}
    assert {p: a for p, a in offenders.items() if a} == {}


# Within the method, one package per idea: the model (In-Place TTT) knows nothing of the slow
# weights, of context parallelism or of the training tools; each of those builds on the model
# alone, besides the shared config and documents (ttt_model.config, ttt_model.data).
IDEAS = {"model": set(), "slow": {"model"}, "parallel": {"model"}, "training": {"model"}}


@pytest.mark.parametrize("idea", sorted(IDEAS))
def test_each_idea_of_the_method_builds_on_the_model_alone(idea):
    allowed = {"config", "data", idea} | IDEAS[idea]
    offenders = {}
    for path in sorted((ROOT / "ttt_model" / idea).rglob("*.py")):
        inside = {m.split(".")[1] for m in imported_modules(path) if m.startswith("ttt_model.")}
        if inside - allowed:
            offenders[str(path.relative_to(ROOT))] = sorted(inside - allowed)
    assert offenders == {}
    assert (ROOT / "ttt_model" / idea / "__init__.py").exists()


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.config import AppConfig\n")
    assert "pipeline" in imported_packages(module)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_observers_follow_the_stream_through_its_events_not_the_run_loop():
    """pipeline.observability subscribes to pipeline.stream_events, which sits below both it and
    pipeline.processing: it imports nothing of the run loop that wires it."""
    offenders = {str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith("pipeline.processing"))
                 for path in sorted((ROOT / "pipeline" / "observability").rglob("*.py"))}
    assert {p: m for p, m in offenders.items() if m} == {}
    assert "pipeline.stream_events" in imported_modules(ROOT / "pipeline" / "observability" / "metrics.py")





@pytest.mark.parametrize("technology, homes, floors", [
    ("kafka", ("pipeline/stream_io",), ("pipeline",)),   # clients and record type; the run loop's records come through it
    ("ray", ("actors",), ("ttt_model", "pipeline")),   # actors, handles, scheduling (StreamActors, ray_pool)
    # the registry, runs and artifacts; a reader writes its states and fetches its base model
    # through objects the driver hands it (StateTarget.artifacts, ReaderSpec.model_source)
    ("mlflow", ("pipeline/state", "pipeline/observability"), ("ttt_model", "actors", "pipeline")),
])
def test_each_technology_is_imported_in_its_homes_alone(technology, homes, floors):
    paths = [path for floor in floors for path in sorted((ROOT / floor).rglob("*.py"))
             if not any(path.relative_to(ROOT).as_posix().startswith(home + "/") for home in homes)]
    offenders = {str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == technology)
                 for path in paths}
    assert {p: m for p, m in offenders.items() if m} == {}


def test_a_version_saved_before_the_base_model_moved_still_finds_it_where_its_code_looks():
    """A version's pyfunc runs the code it was saved with; before, that code imported the base
    model's fetch from actors.base_model, after pipeline.state (which it imports first)."""
    code = ("import pipeline.state.adapted_model\n"
            "from actors.base_model import DEFAULT_CACHE_DIR, local_model_dir\n"
            "import pipeline.state.base_model as home\n"
            "assert local_model_dir is home.local_model_dir and DEFAULT_CACHE_DIR == home.DEFAULT_CACHE_DIR\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
