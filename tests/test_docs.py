"""The docs: a short README whose figures come from bench/results, a site that builds with
--strict, references generated from the code (and current), and commands that exist."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "infra"))

import docs_pages  # noqa: E402  (infra/docs_pages.py)

FIGURE = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:x|%| tok/s)(?![\w])")


def test_the_generated_pages_are_current():
    """docs/generated is committed (the README links to it) and must be what the code and the
    results files say now: run `bash infra/docs.sh` after changing either."""
    generated = ROOT / "docs" / "generated"
    assert (generated / "configuration.md").read_text() == docs_pages.configuration_reference()
    assert (generated / "cli.md").read_text() == docs_pages.cli_reference()
    assert (generated / "modules.md").read_text() == docs_pages.module_map()
    page = (generated / "benchmarks.md").read_text()
    assert all(figure in page for figure in docs_pages.headline_figures().values())


def test_every_config_field_has_a_description():
    from pipeline.config import AppConfig

    fields = docs_pages.config_fields(AppConfig)
    assert len(fields) > 100 and any(path == "model.slow.rank" for path, _ in fields)
    assert [path for path, field in fields if not (field.description or "").strip()] == []


def figures_not_rendered(text: str, rendered: set[str]) -> list[str]:
    return [f for f in FIGURE.findall(text) if f not in rendered and f"+{f}" not in rendered]


def test_the_readme_is_short_and_every_figure_in_it_is_rendered_from_bench_results():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    rendered = set(docs_pages.headline_figures().values())
    assert len(FIGURE.findall(readme)) >= 10
    missing = figures_not_rendered(readme, rendered)
    assert missing == [], f"README figures not on the benchmark results page: {missing}"


def test_the_figure_check_would_catch_a_figure_from_memory():
    """A rendered ratio misremembered by 0.01 is caught; the rendered one passes."""
    rendered = set(docs_pages.headline_figures().values())
    ratio = next(f for f in sorted(rendered) if re.fullmatch(r"\d+\.\d\dx", f)
                 and f"{float(f[:-1]) + 0.01:.2f}x" not in rendered)
    misremembered = f"{float(ratio[:-1]) + 0.01:.2f}x"
    assert figures_not_rendered(f"at {ratio} and {misremembered}", rendered) == [misremembered]


def documented_commands() -> list[tuple[str, str]]:
    """(file, command line) of every `ttt-stream ...` line in the README's and the docs' code."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if "generated" in path.parts:
            continue
        for line in path.read_text().splitlines():
            match = re.match(r"^\s+(?:\.venv/bin/)?ttt-stream (.+)$", line)
            if match:
                out.append((str(path.relative_to(ROOT)), match.group(1).split("#")[0].strip()))
    return out


def test_documented_commands_exist_with_the_options_they_use():
    import typer

    from pipeline.cli import app

    commands = typer.main.get_command(app).commands
    lines = documented_commands()
    assert len(lines) >= 10
    wrong = []
    for where, line in lines:
        name, *args = line.split()
        if name not in commands:
            wrong.append(f"{where}: {line} (no command {name})")
            continue
        if commands[name].context_settings.get("ignore_unknown_options"):
            continue  # train, eval: the options go on to ttt_model's own parser
        options = {o for p in commands[name].params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
        wrong += [f"{where}: {line} (no option {a})" for a in args
                  if a.startswith("-") and a != "-" and a.split("=")[0] not in options | {"--help"}]
    assert wrong == []


@pytest.mark.slow
def test_the_docs_site_builds_with_strict():
    built = subprocess.run(["bash", "infra/docs.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert (ROOT / "site" / "generated" / "configuration" / "index.html").is_file()
    assert "FastWeightState" in (ROOT / "site" / "reference" / "python" / "index.html").read_text()
