"""The ``ttt-stream`` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from pipeline.config import AppConfig, ConfigError, load_config
from pipeline.state.base_model import masked_uri
from pipeline.local.local_stack import LocalStack, StackError, mlflow_answers
from pipeline.stream_io.topics import broker_answers

DEFAULT_CONFIG = Path("configs/local.yaml")
EXIT_CONFIG = 2
EXIT_STACK = 3

app = typer.Typer(
    name="ttt-stream",
    help="Distributed continual-learning stream processor (In-Place TTT on Kafka, Ray, MLflow).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

ConfigOption = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="YAML config file.")


def _load(path: Path) -> AppConfig:
    try:
        return load_config(path)
    except ConfigError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # kafka-python logs every reconnect attempt at INFO while a server starts.
    logging.getLogger("kafka").setLevel(logging.WARNING)


@app.command("config")
def show_config(config: Path = ConfigOption) -> None:
    """Validate a config file and print it back with every default filled in."""
    cfg = _load(config)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="", markup=False)


@app.command()
def up(
    config: Path = ConfigOption,
    bootstrap_servers: Optional[str] = typer.Option(
        None, help="Use this Kafka cluster instead of starting the local broker."
    ),
) -> None:
    """Start the local broker and MLflow server (no-op for those already running)."""
    cfg = _load(config)
    stack = LocalStack(cfg.local_stack)
    try:
        if bootstrap_servers:
            if not broker_answers(bootstrap_servers, client=cfg.kafka.client_settings()):
                raise StackError(f"broker: no Kafka broker answers at {bootstrap_servers}")
            stack.up(skip=("broker",))
        else:
            stack.up()
            # The stream's topics now, with the configured partitions: a standard client that
            # produces first would otherwise make the broker create the documents topic with
            # its own default count.
            from pipeline.stream_io.topics import ensure_topics

            ensure_topics(cfg.kafka)
    except StackError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(EXIT_STACK) from None
    _print_status(stack, cfg)


@app.command()
def down(config: Path = ConfigOption) -> None:
    """Stop the servers that ``up`` started (their whole process groups)."""
    cfg = _load(config)
    stopped = LocalStack(cfg.local_stack).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def status(config: Path = ConfigOption) -> None:
    """The local servers, then the stream: readers, partitions, committed offsets, lag, throughput."""
    cfg = _load(config)
    _print_status(LocalStack(cfg.local_stack), cfg)
    if broker_answers(cfg.kafka.bootstrap_servers, timeout_s=2.0, client=cfg.kafka.client_settings()):
        from pipeline.stream_io.stream_status import read_stream_status

        _print_stream_status(read_stream_status(cfg.kafka))


@app.command()
def run(
    config: Path = ConfigOption,
    until_idle: Optional[float] = typer.Option(
        None, "--until-idle", metavar="SECONDS", help="Stop once nothing arrived or finished for this long."
    ),
    ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster instead of starting Ray here."),
) -> None:
    """Run the stream processor: documents topic -> readers (Ray) -> results; until stopped."""
    from pipeline.processing.job import run_stream

    cfg = _load(config)
    if ray_address:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": ray_address})})
    summary = run_stream(cfg, until_idle_s=until_idle)
    _print_summary(summary.as_dict())


@app.command()
def feed(
    path: str = typer.Argument(..., help="A file, a folder, a .jsonl file, or - for JSONL on stdin."),
    topic: Optional[str] = typer.Option(None, help="Topic to send to (default: the documents topic)."),
    limit: Optional[int] = typer.Option(None, help="Send at most this many messages."),
    config: Path = ConfigOption,
) -> None:
    """Send documents to a topic, with a progress bar."""
    from pipeline.stream_io.feed import feed as send, feed_messages
    from pipeline.stream_io.topics import ensure_topics

    cfg = _load(config)
    ensure_topics(cfg.kafka)
    try:
        sent = send(cfg.kafka, topic or cfg.kafka.topics.documents, feed_messages(path), limit=limit)
    except FileNotFoundError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None
    console.print(f"sent {sent} messages to {topic or cfg.kafka.topics.documents}", markup=False)


@app.command()
def versions(config: Path = ConfigOption) -> None:
    """The stream's checkpoint versions in MLflow: aliases, reason, documents, loss, and the promotion
    gate's verdict with its figures (held-out loss against the base and last-good, forgetting)."""
    from pipeline.state.checkpoint import CheckpointStore
    from pipeline.state.promotion import VERDICT_TAG

    cfg = _load(config)
    store = CheckpointStore(cfg.mlflow, cfg.stream.name)
    rows = store.registry.versions()
    import datetime

    from pipeline.observability.terminal_table import TableColumn, fitting_table

    columns = [TableColumn("version"), TableColumn("aliases"), TableColumn("reason"), TableColumn("parent", 2),
               TableColumn("documents", justify="right"), TableColumn("loss", justify="right"),
               TableColumn("verdict"), TableColumn("vs base", justify="right"),
               TableColumn("vs last-good", 1, justify="right"), TableColumn("forgetting", justify="right"),
               TableColumn("learned / kept out", 2, justify="right"),
               TableColumn("offsets", 3), TableColumn("created", 1)]
    cells = []
    for row in rows:
        tags = row["tags"]
        reason = tags.get("reason", "-")
        if reason == "rollback":
            reason += f" to v{tags.get('rollback_to')} ({tags.get('rollback_cause')})"
        cells.append([
            row["version"], ",".join(row["aliases"]), reason, tags.get("parent_version", "-"),
            tags.get("documents", "-"), _fmt(row["metrics"].get("adapted_loss"), ".4f"),
            # The promotion gate's verdict (pipeline.state.promotion): relative changes of held-out
            # and probe loss, negative is better.
            tags.get(VERDICT_TAG, "-"), _percent(tags.get("ttt.gain_vs_base")),
            _percent(tags.get("ttt.gain_vs_last_good")), _percent(tags.get("ttt.forgetting")),
            f"{_count(tags.get('ttt.documents_learned'))} / {_count(tags.get('ttt.documents_kept_out'))}"
            if VERDICT_TAG in tags and tags[VERDICT_TAG] != "none" else "-",
            tags.get("offsets", "-"),
            datetime.datetime.fromtimestamp(row["created"]).strftime("%Y-%m-%d %H:%M:%S"),
        ])
    table = fitting_table(console, f"{store.name} ({masked_uri(cfg.mlflow.tracking_uri)})", columns, cells)
    console.print(table)
    if not rows:
        console.print(f"no versions of {store.name} yet", markup=False)


@app.command()
def rollback(
    to: str = typer.Option(..., "--to", help="A version number, an alias such as last-good, or base (fresh states)."),
    config: Path = ConfigOption,
    timeout: float = typer.Option(30.0, help="Seconds to wait for the running processor to confirm."),
    offline: bool = typer.Option(False, help="No processor is running: record the rollback in MLflow only."),
) -> None:
    """Roll the stream's adapted state back; a running processor does it at once."""
    from pipeline.stream_io.control_client import request_rollback, rollback_offline

    cfg = _load(config)
    if offline:
        version = rollback_offline(cfg, to)
        console.print(f"live is now v{version}, a copy of {to}; the next `ttt-stream run` starts from it", markup=False)
        return
    result = _answer("rollback", lambda: request_rollback(cfg, to, timeout_s=timeout), timeout)
    console.print(
        f"rolled back to v{result['to']} (from v{result['from']}), recorded as v{result['version']}: readers "
        f"serving it {result['serving_after_request_s']:.2f} s after the request, recorded after "
        f"{result['recorded_after_request_s']:.2f} s", markup=False,
    )


@app.command()
def forget(
    key: str = typer.Argument(..., help="The tenant's key (the records' key, or their JSON 'key')."),
    config: Path = ConfigOption,
    timeout: float = typer.Option(60.0, help="Seconds to wait for the running processor to confirm."),
    offline: bool = typer.Option(False, help="No processor is running: write the version without it in MLflow only."),
) -> None:
    """Erase one tenant's per-key state: in memory, spilled, and from the next version on."""
    from pipeline.stream_io.control_client import forget_offline, request_forget

    cfg = _load(config)
    if offline:
        version, dropped = forget_offline(cfg, key)
        console.print(f"live is now v{version}, without the key ({dropped} states dropped)", markup=False)
        return
    result = _answer("forget", lambda: request_forget(cfg, key, timeout_s=timeout), timeout)
    if result["version"] is None:
        err_console.print(f"forgotten by {result['held']} reader(s) and its tombstone written, but no version could be "
                          "written yet (is MLflow reachable?): the processor writes it, and erases the key's files, "
                          "as soon as it can", markup=False, highlight=False)
        raise typer.Exit(1)
    console.print(f"forgotten by {result['held']} reader(s); v{result['version']} holds no state of it, and no "
                  "earlier version its files", markup=False)


@app.command()
def release(
    key: str = typer.Argument(..., help="The tenant's key (the records' key, or their JSON 'key')."),
    config: Path = ConfigOption,
    timeout: float = typer.Option(30.0, help="Seconds to wait for the running processor to confirm."),
) -> None:
    """Let a quarantined tenant's documents be learned again (the learner's admission checks
    quarantine a key whose documents are kept out too often; an alert names its state)."""
    from pipeline.stream_io.control_client import request_release

    cfg = _load(config)
    result = _answer("release", lambda: request_release(cfg, key, timeout_s=timeout), timeout)
    console.print(f"state {result['state_key']}: " + ("released: its documents are learned again" if result["released"]
                                                      else "was not quarantined"), markup=False)


def _answer(action: str, send: Callable[[], dict[str, Any] | None], timeout: float) -> dict[str, Any]:
    """The running processor's answer to a command sent by ``send``; exits on anything else."""
    try:
        result = send()
    except RuntimeError as err:  # no control key to sign with
        err_console.print(f"error: {err}", markup=False)
        raise typer.Exit(2) from None
    if result is None:
        err_console.print(f"error: no running processor confirmed within {timeout:.0f} s (use --offline if none runs)")
        raise typer.Exit(1)
    if result["type"] != action:
        err_console.print(f"error: {action} failed: {result.get('error')}", markup=False)
        raise typer.Exit(1)
    return result


@app.command("register-model")
def register_model(
    directory: Path = typer.Argument(..., help="A model directory: config.json, weights, tokenizer."),
    name: str = typer.Option(..., "--name", help="The registered model's name in MLflow."),
    alias: Optional[str] = typer.Option(None, help="An alias to move to the new version (e.g. base)."),
    config: Path = ConfigOption,
) -> None:
    """Register a base model in MLflow (every file's sha256 in the version's tags), for model.path:
    models:/NAME@ALIAS on clusters without a shared file system."""
    from pipeline.state.base_model import register_base_model

    cfg = _load(config)
    try:
        source = register_base_model(directory, name, cfg.mlflow.tracking_uri, cfg.mlflow.experiment, alias)
    except FileNotFoundError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None
    where = f"models:/{name}@{alias}" if alias else source.uri
    console.print(f"registered {directory} as {source.uri} ({len(source.files)} files): model.path: {where}", markup=False)


@app.command("convert-reference")
def convert_reference(
    source: Path = typer.Argument(..., help="A checkpoint saved by the paper's reference implementation."),
    out: Path = typer.Argument(..., help="Folder for the converted checkpoint (model.path can name it)."),
) -> None:
    """Convert a reference In-Place TTT checkpoint (ByteDance-Seed/In-Place-TTT) to this format:
    its ttt_* config as our TTT config, ttt_proj stored transposed, base weights unchanged."""
    from ttt_model.training.reference_checkpoint import convert_reference_checkpoint

    try:
        written = convert_reference_checkpoint(source, out)
    except (FileNotFoundError, ValueError) as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None
    console.print(f"converted {source} -> {written}", markup=False)


@app.command()
def export(
    version: str = typer.Option(..., "--version", help="A version number or alias (live, last-good)."),
    out: Path = typer.Option(..., "--out", help="Folder for the Hugging Face model."),
    reader: Optional[str] = typer.Option(None, help="Whose state, when the version holds several."),
    key: Optional[str] = typer.Option(None, help="Which tenant's state (per_key scope): the records' key."),
    config: Path = ConfigOption,
) -> None:
    """Write a plain Hugging Face model with a version's adapted state merged into W_down."""
    from pipeline.state.checkpoint import CheckpointError, CheckpointStore
    from pipeline.state.export import export_checkpoint

    from pipeline.state.tenant_keys import TenantKeys

    cfg = _load(config)
    try:
        store = CheckpointStore(cfg.mlflow, cfg.stream.name)
        checkpoint = store.load(version)
        state_key = TenantKeys(store.registry.key_salt()).state_key_of(key) if key is not None else None
        if state_key is not None and store.registry.forgotten_in(checkpoint.version, state_key):
            raise CheckpointError(f"the key was forgotten (state {state_key}) after v{checkpoint.version}: "
                                  "its state there is erased")
        export_checkpoint(checkpoint, out, reader, state_key, cfg.mlflow.tracking_uri)
    except CheckpointError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    console.print(f"exported v{checkpoint.version} to {out}", markup=False)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(tag: str | None) -> str:
    return "-" if tag is None else f"{100 * float(tag):+.2f}%"


def _count(tag: str | None) -> str:
    return "-" if tag is None else str(int(float(tag)))


def _print_summary(summary: dict) -> None:
    table = Table(title="ttt-stream run")
    table.add_column("")
    table.add_column("value", justify="right")
    adapted, base = summary["sampled_adapted_loss"], summary["sampled_base_loss"]
    rows = [
        ("documents", str(summary["documents"])),
        ("dead letters", str(summary["dead_letters"])),
        ("tokens", str(summary["tokens"])),
        ("tokens/s", _fmt(summary["tokens_per_s"], ".0f")),
        ("documents/s", _fmt(summary["documents_per_s"], ".2f")),
        ("adapted loss, all documents", _fmt(summary["adapted_loss"], ".4f")),
        (f"sampled documents ({summary['sampled_documents']}): adapted loss", _fmt(adapted, ".4f")),
        (f"sampled documents ({summary['sampled_documents']}): static-model loss", _fmt(base, ".4f")),
        ("adapted vs static", "-" if adapted is None else f"{100 * (adapted - base) / base:+.2f}%"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def _print_stream_status(status: dict) -> None:
    report = status["last_report"]
    if report is None:
        console.print("stream: no status report on the metrics topic yet (is `ttt-stream run` running?)")
    else:
        import time as clock

        age = clock.time() - report["time"]
        console.print(
            f"stream {report['stream']}: {'stopped' if report.get('final') else 'running'}, last report "
            f"{age:.0f} s ago; {report['documents']} documents, {report['dead_letters']} dead letters, "
            f"{_fmt(report.get('tokens_per_s'), '.0f')} tokens/s, {report['in_flight']} in flight, "
            f"{report['queued']} queued",
            markup=False, highlight=False,
        )
        from pipeline.observability.terminal_table import TableColumn, fitting_table

        columns = [TableColumn("reader"), TableColumn("alive"), TableColumn("restarted", 2), TableColumn("node", 4),
                   TableColumn("partitions"), TableColumn("documents", justify="right"),
                   TableColumn("tokens", 1, "right"), TableColumn("parallel windows", 3, "right"),
                   TableColumn("device", 5)]
        cells = [[
            w["reader"], "yes" if w.get("alive") else "no", "yes" if w.get("restarted") else "no",
            f"{w['node_ip']} ({w['node_id'][:8]})" if w.get("node_id") else "-",
            ",".join(map(str, w.get("partitions", []))), str(w.get("documents", "-")),
            str(w.get("tokens", "-")), str(w.get("parallel_windows", "-")), w.get("device", "-"),
        ] for w in report.get("readers", [])]
        readers = fitting_table(console, "readers", columns, cells)
        console.print(readers)
        cp = report.get("context_parallel")
        if cp is not None:
            console.print(
                f"context-parallel group: {cp.get('world', '-')} members, {cp.get('reads', '-')} reads, "
                f"{cp.get('failures', '-')} failures" + ("" if cp.get("formed", True) else " (not formed)"),
                markup=False, highlight=False,
            )
    partitions = Table(title="documents topic: consumer group offsets")
    for column in ("partition", "committed", "end", "lag"):
        partitions.add_column(column, justify="right")
    for row in status["partitions"]:
        partitions.add_row(
            str(row["partition"]), _fmt(row["committed"], "d"), _fmt(row["end"], "d"),
            "unknown (broker end offset below committed)" if row["lag"] is None and row["committed"] is not None
            else _fmt(row["lag"], "d"),
        )
    console.print(partitions)


PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("corpus")
def corpus(out: Path = typer.Option(Path("data/corpus"), help="Where to write the corpus.")) -> None:
    """Build the shipped corpus (Python 3.11 manual + Linux 6.1 docs) from Debian packages."""
    from pipeline.local.corpus import build_corpus

    manifest = build_corpus(out)
    console.print(f"corpus in {out}: {manifest['documents']}", markup=False)


def _run_tracked(config: Path, mlflow: bool, run_name: str, args: list[str], run, after=None) -> None:
    """``run(args)``, inside an MLflow run of the configured server unless disabled or asking for help."""
    if not mlflow or "--help" in args or "-h" in args:
        run(args)
        return
    from pipeline.observability.tracking import mlflow_run

    cfg = _load(config)
    with mlflow_run(cfg.mlflow, run_name, {"argv": " ".join(args)}):
        result = run(args)
        if after is not None:
            after(result)


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def train(
    ctx: typer.Context,
    config: Path = ConfigOption,
    mlflow: bool = typer.Option(True, help="Log params and metrics to the configured MLflow server."),
) -> None:
    """Prepare data or train a model; arguments go to `python -m ttt_model.training.train` (see --help)."""
    from pipeline.observability.tracking import log_metrics, log_params
    from ttt_model.training import train as trainer

    args = list(ctx.args)
    tracked = mlflow and not (args and args[0] == "prepare")

    def run(argv: list[str]):
        return trainer.main(argv, on_metrics=log_metrics if tracked else None)

    def log_final(final) -> None:
        log_params({"final_model": final})

    _run_tracked(config, tracked, "train", args, run, log_final)


@app.command("eval", context_settings=PASSTHROUGH, add_help_option=False)
def evaluate(
    ctx: typer.Context,
    config: Path = ConfigOption,
    mlflow: bool = typer.Option(True, help="Log the table and plot to the configured MLflow server."),
) -> None:
    """Held-out loss by position (static / in-place / gradient); args go to `python -m ttt_model.training.evaluate`."""
    from pipeline.observability.tracking import log_eval_result
    from ttt_model.training import evaluate as evaluator

    args = list(ctx.args)
    out = Path(args[args.index("--out") + 1]) if "--out" in args[:-1] else None
    _run_tracked(config, mlflow, "eval", args, evaluator.main, lambda result: log_eval_result(result, out))


def _print_status(stack: LocalStack, cfg: AppConfig) -> None:
    from pipeline.observability.terminal_table import TableColumn, fitting_table

    answers = {
        "broker": broker_answers(cfg.kafka.bootstrap_servers, timeout_s=2.0, client=cfg.kafka.client_settings()),
        "mlflow": mlflow_answers(cfg.mlflow.tracking_uri),
    }
    cells = [[server.name, server.url, str(server.pid) if server.running else "-",
              "yes" if answers[server.name] else "no", str(server.log_path)] for server in stack.status()]
    cells.append(["ray", cfg.ray.address or f"in-process (ray.init, num_cpus={cfg.ray.num_cpus})", "-", "-", "-"])
    columns = [TableColumn("server"), TableColumn("address"), TableColumn("pid", 1), TableColumn("answers"),
               TableColumn("log", 2)]
    table = fitting_table(console, "ttt-stream local stack", columns, cells)
    console.print(table)
    topics = cfg.kafka.topics
    console.print(
        f"MLflow UI: {masked_uri(cfg.mlflow.tracking_uri)}   Kafka: {cfg.kafka.bootstrap_servers}   topics: "
        f"{topics.documents}, {topics.results}, {topics.metrics}, {topics.alerts}, "
        f"{topics.dead_letter}, {topics.control}",
        markup=False,
        highlight=False,
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
