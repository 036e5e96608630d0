"""Write the generated pages of the docs site: the configuration reference (from the pydantic
config), the CLI reference (from the typer app) and the benchmark tables and plots (from
bench/results). ``bash infra/docs.sh`` runs this, then ``mkdocs build --strict``.

The README's headline figures are taken from the same tables (``headline_figures``), and a test
checks that every figure in the README is one of them.
"""

from __future__ import annotations

import json
import statistics
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "docs" / "generated"
RESULTS = ROOT / "bench" / "results"

sys.path.insert(0, str(ROOT))


# -- configuration reference ------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation)).replace("NoneType", "None")
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return str(annotation).replace("typing.", "")


def _bounds(field) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    parts = []
    for meta in field.metadata:
        for name, sign in signs.items():
            value = getattr(meta, name, None)
            if value is not None:
                parts.append(f"{sign} {value}")
        if getattr(meta, "pattern", None):
            parts.append(f"matches `{meta.pattern}`")
    return ", ".join(parts)


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def config_fields(model, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, field) of every field of ``model`` and its sections, depth first."""
    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append((path, field))
        annotation = field.annotation
        for candidate in (annotation, *typing.get_args(annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out += config_fields(candidate, path + ".")
    return out


def configuration_reference() -> str:
    from pipeline.config import AppConfig

    lines = ["# Configuration reference", "",
             "Generated from the config model (`pipeline/config.py`, `ttt_model/config.py`) by "
             "`infra/docs_pages.py`. A YAML file sets any of these by its dotted path; an environment "
             "variable `TTT_STREAM__A__B=value` sets `a.b`. An unknown field, or a value out of bounds, fails "
             "at load with the field's path.", ""]
    section = None
    for path, field in config_fields(AppConfig):
        if "." not in path:
            continue  # a section: its fields follow under its heading
        head = path.rsplit(".", 1)[0]
        if head != section:
            section = head
            lines += ["", f"## `{head}`", "", "| field | type | default | bounds | description |",
                      "| --- | --- | --- | --- | --- |"]
        description = (field.description or "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{path.rsplit('.', 1)[1]}` | `{_type_name(field.annotation)}`".replace("|`", "| `")
                     + f" | {_default(field)} | {_bounds(field)} | {description} |")
    return "\n".join(lines) + "\n"


# -- CLI reference -----------------------------------------------------------------------------------

def cli_reference() -> str:
    import typer

    from pipeline.cli import app

    group = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated from the `ttt-stream` command line (`pipeline/cli.py`).", "",
             "    ttt-stream [--verbose] COMMAND [OPTIONS] [ARGUMENTS]", ""]
    for name, command in sorted(group.commands.items()):
        lines += [f"## `ttt-stream {name}`", "", (command.help or "").strip(), ""]
        rows = []
        for param in command.params:
            if param.param_type_name == "argument":
                rows.append((f"`{param.name.upper()}`", "argument", "", (getattr(param, "help", None) or "").replace("|", "\\|")))
            else:
                flag = getattr(param, "is_flag", False)
                default = "" if param.default in (None, False) else f"`{param.default}`"
                rows.append((", ".join(f"`{o}`" for o in param.opts), "flag" if flag else "option",
                             default, (param.help or "").replace("|", "\\|")))
        if rows:
            lines += ["| name | kind | default | help |", "| --- | --- | --- | --- |"]
            lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
            lines.append("")
    return "\n".join(lines) + "\n"


# -- benchmarks --------------------------------------------------------------------------------------

def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _pct(value: float) -> str:
    return f"{100 * value:+.1f}%"


def _pct2(value: float) -> str:
    return f"{100 * value:+.2f}%"


def worker_table(name: str) -> tuple[list[str], dict[str, str]]:
    """bench/reader.py on a GPU, slow weights on: x the static scorer per length."""
    data = _load(name)
    columns = [("reader of a learner's version", "reader of a learner's version, tokenizing ahead / static"),
               ("synchronous slow step", "slow+fast pairs / static"),
               ("learner", "learner pairs / static"),
               ("fast weights only", "worker tokenizing ahead / static")]
    lines = ["| tokens | static tok/s | " + " | ".join(c for c, _ in columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    figures = {}
    for row in data["rows"]:
        tokens = int(row["tokens"])
        cells = [_x(row[key]) for _, key in columns]
        lines.append(f"| {tokens:,} | {row['static tok/s']:,.0f} | " + " | ".join(cells) + " |")
        for (label, _), cell in zip(columns, cells):
            figures[f"{label} at {tokens}"] = cell
    args = data["args"]
    command = (f"PYTHONPATH=. python bench/reader.py --preset {args['preset']} --device {args['device']} --dtype "
               f"{args['dtype']} --lengths {' '.join(map(str, args['lengths']))} --chunk {args['chunk']} --layers "
               f"{' '.join(map(str, args['layers']))} --documents {args['documents']} --warmup {args['warmup']} --slow"
               + (" --profile" if args.get("profile") else ""))
    head = [f"`bench/results/{name}` · {data.get('device', '?')} · `{command}`", ""]
    return head + lines, figures


def demo_table(names: list[str]) -> tuple[list[str], dict[str, str]]:
    lines = ["| run | documents | tokens/s | sampled adapted vs static loss | versions |", "| --- | --- | --- | --- | --- |"]
    figures = {}
    for name in names:
        d = _load(name)
        label = "reader + learner, lag 1" if "every2" not in name else "reader + learner, lag 1, learner.every 2"
        lines.append(f"| {label} (`{name}`) | {d['documents']} | {d['tokens_per_s']:,} tok/s | "
                     f"{_pct(d['adapted_vs_static'])} | {d.get('versions', '')} |")
        figures[f"demo {label} tok/s"] = f"{d['tokens_per_s']:,} tok/s"
        figures[f"demo {label} loss"] = _pct(d["adapted_vs_static"])
    d = _load(names[0])
    head = [f"`{d['command']}` · {d['machine']} · {d['date']}", ""]
    return head + lines, figures


def learning_table(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """bench/domain_stream.py: what the stream's learning buys on a domain it was not trained on."""
    lines = ["| stream order | held-out: live vs base, read statically | held-out: live vs base, with fast weights | "
             "last quarter: slow+fast vs fast only | forgetting: shipped held-out, live vs base | slow+fast tok/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    figures = {}
    for name in names:
        d = _load(name)
        domain, shipped = d["heldout"]["domain_heldout"], d["heldout"]["shipped_heldout"]
        static = domain["live_static"] / domain["base_static"] - 1
        fast = domain["live_fast"] / domain["base_fast"] - 1
        forgetting = shipped["live_static"] / shipped["base_static"] - 1
        quarter = d["last_quarter_slow_fast_vs_fast"]
        lines.append(f"| seed {d['seed']} (`{name}`) | {_pct2(static)} | {_pct2(fast)} | {_pct2(quarter)} | "
                     f"{_pct2(forgetting)} | {d['tokens_per_s']['slow+fast']:,.0f} |")
        for label, value in (("held-out", static), ("held-out with fast weights", fast), ("last quarter", quarter),
                             ("forgetting", forgetting)):
            figures[f"seed {d['seed']} {label}"] = _pct2(value)
    return lines, figures


def context_parallel_table(names: list[str]) -> tuple[list[str], dict[str, str]]:
    lines = ["| file | tokens | ranks | seconds | speed-up vs 1 rank |", "| --- | --- | --- | --- | --- |"]
    figures = {}
    for name in names:
        d = _load(name)
        one = next(r["seconds"] for r in d["rows"] if r["ranks"] == 1)
        for row in d["rows"]:
            if row["ranks"] == 1:
                continue
            speedup = one / row["seconds"]
            lines.append(f"| `{name}` | {d['args']['length']:,} | {row['ranks']} | {row['seconds']:.3f} | {_x(speedup)} |")
            figures[f"context parallel {row['ranks']} ranks"] = _x(speedup)
    return lines, figures


def checkpoint_memory_table(name: str) -> tuple[list[str], dict[str, str]]:
    """bench/checkpoint_memory.py: the driver's memory over one checkpoint, by who writes the states."""
    d = _load(name)
    lines = ["| who writes the states | readers x keys | states | GB written | seconds | driver memory growth | "
             "in states |", "| --- | --- | --- | --- | --- | --- | --- |"]
    figures = {}
    for row in d["rows"]:
        growth = row["driver_rss_growth_bytes"] / 2**20
        gb = row["states"] * row["state_bytes"] / 1e9
        lines.append(f"| {row['how']} | {row['readers']} x {row['keys_per_reader']:,} | {row['states']:,} | {gb:.1f} | "
                     f"{row['checkpoint_s']:.1f} | {growth:.1f} MiB | {row['driver_rss_growth_in_states']:.2f} |")
        figures[f"checkpoint {row['how']} {row['states']} states"] = f"{row['driver_rss_growth_in_states']:.2f}"
    head = [f"`{d['command']}` · {d['machine']} · states of {d['rows'][0]['state_bytes'] / 1e6:.1f} MB (the shipped "
            "model's per-key state)", ""]
    return head + lines, figures


def gate_demo_table(name: str) -> tuple[list[str], dict[str, str]]:
    """The demo with the promotion gate and the admission checks on and off, runs side by side."""
    d = _load(name)
    lines = ["| run | gate and checks | documents | tokens/s | sampled adapted vs static loss | verdicts |",
             "| --- | --- | --- | --- | --- | --- |"]
    figures = {}
    for run in d["runs"]:
        lines.append(f"| {run['order']} | {run['setting']} | {run['documents']} | {run['tokens_per_s']:,} | "
                     f"{_pct(run['adapted_vs_static'])} | {', '.join(run['verdicts']) or '-'} |")
    on = [r["tokens_per_s"] for r in d["runs"] if r["setting"] == "on"]
    off = [r["tokens_per_s"] for r in d["runs"] if r["setting"] == "off"]
    ratio = (sum(on) / len(on)) / (sum(off) / len(off))
    lines += ["", f"Mean tokens/s with the gate and the checks on / off: **{ratio:.2f}x** (the learner sets the "
              "demo's pace, and it learns neither the held-out slice nor what the checks keep out)."]
    figures["demo gate and checks on / off"] = f"{ratio:.2f}x"
    head = [f"`{d['command']}` · {d['machine']} · {d['date']}", ""]
    return head + lines, figures


def topology_table(name: str) -> tuple[list[str], dict[str, str]]:
    """bench/demo_topology.py: the demo read by the synchronous learner and by a reader beside the learner."""
    d = _load(name)
    lines = ["| run | setting | documents | tokens/s | sampled adapted vs static loss | verdicts |",
             "| --- | --- | --- | --- | --- | --- |"]
    for run in d["runs"]:
        lines.append(f"| {run['order']} | {run['setting']} | {run['documents']} | {run['tokens_per_s']:,} | "
                     f"{_pct(run['adapted_vs_static'])} | {', '.join(run['verdicts']) or '-'} |")
    (sync, sync_mean), (split, split_mean) = d["mean_tokens_per_s"].items()
    ratio = d["synchronous_over_reader_and_learner"]
    lines += ["", f"Mean: {sync} **{sync_mean:,.0f} tok/s**, {split} {split_mean:,.0f} tok/s: **{ratio:.2f}x**."]
    figures = {"demo synchronous tok/s": f"{sync_mean:,.0f} tok/s", "demo reader + learner tok/s": f"{split_mean:,.0f} tok/s",
               "demo synchronous / reader + learner": f"{ratio:.2f}x"}
    head = [f"`{d['command']}` · {d['machine']} · {d['date']}", ""]
    return head + lines, figures


def admission_tables(names: list[str]) -> tuple[list[str], dict[str, str]]:
    lines, figures = [], {}
    for name in names:
        table, found = admission_table(name)
        lines += [*table, ""]
        figures.update(found)
    return lines, figures


def admission_table(name: str) -> tuple[list[str], dict[str, str]]:
    """bench/learning_admission.py: a domain stream, clean and 30% junk, the checks and the gate on and off."""
    d = _load(name)
    lines = ["| stream | checks and gate | held-out: live vs base | forgetting | documents learned (clean / junk) | "
             "learner time on junk | verdicts | kept out |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    figures = {}
    for setting, run in d["settings"].items():
        stream, switch = setting.split(":")
        kept = {k: v for k, v in run["decisions"].items() if k not in ("admitted", "held out")}
        verdicts = {v: run["verdicts"].count(v) for v in sorted(set(run["verdicts"]))}
        lines.append(f"| {stream} | {switch} | {_pct2(run['heldout_gain'])} | {_pct2(run['forgetting'])} | "
                     f"{run['learned']['clean']} / {run['learned']['junk']} | {100 * run['learner_share_on_junk']:.0f}% | "
                     f"{', '.join(f'{k} {v}' for k, v in verdicts.items()) or '-'} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(kept.items())) or '-'} |")
        figures[f"every {d['every']} {stream} {switch} held-out"] = _pct2(run["heldout_gain"])
        figures[f"every {d['every']} {stream} {switch} forgetting"] = _pct2(run["forgetting"])
        figures[f"every {d['every']} {stream} {switch} junk share"] = f"{100 * run['learner_share_on_junk']:.0f}%"
    head = [f"`python bench/learning_admission.py --domain {d['domain']} --every {d['every']}` · {d['documents']} "
            f"documents of the domain (at most {d['max_tokens']} tokens), {100 * d['junk']:.0f}% junk in the poisoned "
            f"stream · the learner takes one in {d['every']} · {d['heldout_documents']} held-out documents of the "
            f"domain, {d['shipped_documents']} of the shipped held-out set (forgetting) · {d['machine']}", ""]
    return head + lines, figures


def plots(out: Path) -> list[str]:
    """PNGs from the same files: loss by stream position, reading speed by document length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    d = _load("domain_stream/pandas_learner_default_seed0.json")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, values in d["stream_by_tenth"].items():
        ax.plot([10 * (i + 1) for i in range(len(values))], values, marker="o", label=label)
    ax.set_xlabel("position in the stream (%)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("pandas documents, seed 0")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_by_position.png", dpi=100)
    plt.close(fig)
    made.append("loss_by_position.png")
    d = _load("worker/h200_slow_final.json")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    tokens = [int(r["tokens"]) for r in d["rows"]]
    for label, key in (("static scorer", "static tok/s"),
                       ("reader of a learner's version", "reader of a learner's version, tokenizing ahead tok/s"),
                       ("synchronous slow step", "slow+fast tok/s")):
        ax.plot(tokens, [r[key] for r in d["rows"]], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("document tokens")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{d.get('device', '')}, Qwen3-0.6B shape, bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput_by_length.png", dpi=100)
    plt.close(fig)
    made.append("throughput_by_length.png")
    return made


SECTIONS: list[tuple[str, str, Callable[[], tuple[list[str], dict[str, str]]]]] = [
    ("Reading and learning on one GPU", "Qwen3-0.6B shape, bf16, chunk 1,024, TTT layers 0/6/12/18/24, the embedded "
     "default's slow settings; x the static scorer on the same documents (slow steps: median pair of documents).",
     lambda: worker_table("worker/h200_slow_final.json")),
    ("The same at 2k tokens, 20 documents", "Short documents vary most from run to run: the same bench with 20 timed "
     "documents of 2,048 tokens.", lambda: worker_table("worker/h200_slow_2k_20docs.json")),
    ("The demo on one device: the synchronous learner, or a reader beside the learner", "`bash infra/demo.sh` "
     "(40 held-out documents through the whole pipeline, every one learned) with `processor.learner.synchronous` on "
     "(the embedded default: the learner reads and learns each document in one forward, on both cores) and off (a "
     "reader and the learner on a core each, the learner fed the hidden states below the adapters, `lag` 2), the "
     "runs alternating on one machine.", lambda: topology_table("demo_topology.json")),
    ("The demo on 2 CPU cores, before", "`bash infra/demo.sh` when a reader and the learner (which read each "
     "document again, whole) were the embedded default, `lag` 1.",
     lambda: demo_table(["demo_cpu_learner.json", "demo_cpu_learner_every2.json"])),
    ("What the stream learns", "`bench/domain_stream.py --domain pandas`: the stream's model (`live`) against the base "
     "model on held-out documents of the domain, and on the shipped held-out set (forgetting).",
     lambda: learning_table(["domain_stream/pandas_learner_default_seed0.json",
                             "domain_stream/pandas_learner_default_seed1.json"])),
    ("The promotion gate and the admission checks on the demo", "`bash infra/demo.sh` with "
     "`processor.learner.gate` and `processor.learner.admission` on (the embedded default) and off, the runs "
     "alternating on one machine.", lambda: gate_demo_table("demo_gate_checks.json")),
    ("Learning spent where it pays", "`bench/learning_admission.py`: the stream's parts in the ledger's order "
     "(the driver's checks and held-out slice, the learner with its gate), a domain the model never saw, clean and "
     "with junk: spam, random characters, near-copies of one document, one tenant's word salad. `live` is the last "
     "version the gate promoted (off: the last version). One stream order (seed 0): differences of a point "
     "between settings are within what the choice of documents learned moves.",
     lambda: admission_tables(["learning_admission.json", "learning_admission_every1.json"])),
    ("Context parallelism", "`bench/context_parallel.py`, 64k tokens, H200 GPUs, against one rank.",
     lambda: context_parallel_table(["h200x2_cp_65536_w0.00018.json", "h200x4_cp_65536_w0.00018.json"])),
    ("Checkpoint memory", "`bench/checkpoint_memory.py`: the driver's resident memory over one checkpoint of per-key "
     "states on the embedded MLflow, when each reader uploads its own states (what `ttt-stream run` does) and, at "
     "fewer keys, when the driver gathers them all (before). Growth in MiB and in states.",
     lambda: checkpoint_memory_table("checkpoint_memory.json")),
]


def headline_figures() -> dict[str, str]:
    """Every figure the benchmark page shows, by label: what the README may quote."""
    figures = {}
    for _, _, render in SECTIONS:
        figures.update(render()[1])
    return figures


def benchmarks_page(out: Path) -> str:
    lines = ["# Benchmark results", "",
             "Rendered by `infra/docs_pages.py` from the JSON files in `bench/results`; each table names its "
             "file and the command that wrote it.", ""]
    for title, intro, render in SECTIONS:
        table, _ = render()
        lines += [f"## {title}", "", intro, "", *table, ""]
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots(out)] + [""]
    return "\n".join(lines)


def main() -> None:
    GENERATED.mkdir(parents=True, exist_ok=True)
    (GENERATED / "configuration.md").write_text(configuration_reference())
    (GENERATED / "cli.md").write_text(cli_reference())
    (GENERATED / "benchmarks.md").write_text(benchmarks_page(GENERATED))
    print(f"wrote {GENERATED.relative_to(ROOT)}/: configuration.md, cli.md, benchmarks.md and plots")


if __name__ == "__main__":
    main()
