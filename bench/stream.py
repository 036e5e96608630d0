"""Throughput of the whole pipeline against the same model fed directly, in one run.

    python bench/stream.py -c configs/local.yaml --documents 24 --max-tokens 2048

1. direct: what reads the stream, in this process, reads the documents one after another: with
   the embedded default's synchronous learner (``processor.learner.synchronous``), a
   ``StreamLearner`` reading and learning each; without a learner, one ``DocumentReader``;
2. pipeline: the same documents fed to a fresh documents topic and read by ``ttt-stream run``'s
   machinery (Kafka source, the same actor with the same model and threads, results to Kafka),
   timed from the first record read to the last result.

Both use the config's model and processor settings with one reader, no base-model shadow, no
held-out slice and no learning checks (the direct reader has none), so that both do the same
model work. The overhead is the pipeline's extra time over the direct model time. Starts the
local broker if it is not running (and stops it after). A config with readers beside a learner
has no one direct reader to compare with: it is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from actors.call_types import DocumentOutcome, DocumentTask, ReaderSpec
from actors.document_reader import DocumentReader
from actors.learner import StreamLearner
from pipeline.config import AppConfig, load_config
from pipeline.processing.actor_specs import as_actors_see_it, reader_spec
from pipeline.processing.job import run_stream
from pipeline.local.local_stack import LocalStack
from ttt_model.data import load_documents


def documents(path: Path, n: int, max_tokens: int, tokenizer) -> list[dict]:
    out = []
    for doc in load_documents(path):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            out.append({"id": doc.id, "text": tokenizer.decode(ids[:max_tokens])})
        if len(out) == n:
            return out
    raise SystemExit(f"{path}: fewer than {n} documents of {max_tokens} tokens")


def direct_reading(config: AppConfig, spec: ReaderSpec, name: str) -> tuple[Callable[[DocumentTask], DocumentOutcome], Any]:
    """What reads the configured stream, in this process: (its read, its tokenizer). With the
    synchronous learner, a ``StreamLearner`` that reads and learns each document; with no
    learner, one ``DocumentReader``. Readers beside a learner read its versions: refused."""
    learner = config.processor.learner
    if learner.enabled and not learner.synchronous:
        raise SystemExit("with readers beside a learner there is no one direct reader (set "
                         "processor.learner.synchronous: true, or learner.enabled: false)")
    if learner.enabled:
        direct = StreamLearner(spec, name=name)
        return direct.read, direct.reader.tokenizer
    reader = DocumentReader(spec, name)
    return reader.process, reader.tokenizer


def result_timestamps(config) -> dict[str, tuple[int, float]]:
    """Document id -> (timestamp (ms) of its result record, the reader's own time on it (ms))."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        config.kafka.topics.results, bootstrap_servers=config.kafka.bootstrap_servers,
        auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000,
    )
    stamps = {json.loads(r.value)["id"]: (r.timestamp, json.loads(r.value)["latency_ms"]) for r in consumer}
    consumer.close()
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=Path("configs/local.yaml"))
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus/heldout.jsonl"))
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in both runs")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    run_id = uuid.uuid4().hex[:8]
    config = load_config(args.config)
    topics = config.kafka.topics.model_copy(update={
        name: f"bench.{run_id}.{name}" for name in ("documents", "results", "metrics", "alerts", "dead_letter", "control")
    } | {"partitions": 1})
    learner = config.processor.learner
    learner = learner.model_copy(update={"num_cpus": args.threads,
                                         "gate": learner.gate.model_copy(update={"enabled": False}),
                                         "admission": learner.admission.model_copy(update={"enabled": False})})
    config = config.model_copy(update={
        "kafka": config.kafka.model_copy(update={"topics": topics, "group_id": f"bench-{run_id}"}),
        "processor": config.processor.model_copy(update={
            "readers": 1, "reader_num_cpus": args.threads, "base_loss_sample_rate": 0.0, "learner": learner,
            "max_document_tokens": args.max_tokens * 2, "status_interval_s": 3600.0,
            # The pipeline's own overhead: no MLflow checkpoints (the bench starts no MLflow
            # server), so no monitor and no rollback either.
            "checkpoint": config.processor.checkpoint.model_copy(update={"enabled": False}),
            # The Prometheus endpoint stays on (it is part of every run), on a free port.
            "metrics": config.processor.metrics.model_copy(update={"port": 0}),
        }),
        "mlflow": config.mlflow.model_copy(update={"processor_runs": False}),
        "ray": config.ray.model_copy(update={"num_cpus": max(config.ray.num_cpus, args.threads)}),
    })
    spec = reader_spec(as_actors_see_it(config))

    torch.set_num_threads(args.threads)
    read, tokenizer = direct_reading(config, spec, "direct")
    docs = documents(args.corpus, args.documents, args.max_tokens, tokenizer)
    read(DocumentTask("warm-up", docs[0]["text"]))
    start = time.perf_counter()
    direct_tokens = sum(read(DocumentTask(d["id"], d["text"])).tokens for d in docs)
    direct_s = time.perf_counter() - start
    del read

    stack = LocalStack(config.local_stack)
    started_broker = not next(s for s in stack.status() if s.name == "broker").running
    if started_broker:
        stack.up(skip=("mlflow",))
    try:
        from kafka import KafkaProducer

        from pipeline.stream_io.topics import ensure_topics

        ensure_topics(config.kafka)
        producer = KafkaProducer(bootstrap_servers=config.kafka.bootstrap_servers)
        # A warm-up document first, as in the direct run.
        for d in [{"id": "warm-up", "text": docs[0]["text"]}] + docs:
            producer.send(config.kafka.topics.documents, value=json.dumps(d).encode())
        producer.flush()
        producer.close()
        summary = run_stream(config, until_idle_s=3.0)
        if summary.documents != len(docs) + 1:
            raise SystemExit(f"pipeline processed {summary.documents} of {len(docs) + 1} documents")
        stamps = result_timestamps(config)
    finally:
        if started_broker:
            stack.down()
    # Pipeline time: from the warm-up document's result to the last result, by the results'
    # record timestamps (set by the processor's producer as each result is sent), so both sides
    # time the same documents after the same warm-up.
    pipeline_docs = len(stamps) - 1
    pipeline_s = (max(t for t, _ in stamps.values()) - stamps["warm-up"][0]) / 1000.0
    # The reader actor's own time on the same documents: what of the difference is the model
    # running slower inside the actor, and what is the pipeline around it.
    actor_s = sum(ms for doc, (_, ms) in stamps.items() if doc != "warm-up") / 1000.0
    pipeline_tokens = direct_tokens
    rows = {
        "documents": len(docs),
        "tokens": direct_tokens,
        "direct_s": direct_s,
        "pipeline_s": pipeline_s,
        "direct_tokens_per_s": direct_tokens / direct_s,
        "pipeline_tokens_per_s": pipeline_tokens / pipeline_s,
        "direct_documents_per_s": len(docs) / direct_s,
        "pipeline_documents_per_s": pipeline_docs / pipeline_s,
        "pipeline_documents": pipeline_docs,
        "overhead_vs_model_time": pipeline_s / direct_s - 1.0,
        "actor_busy_s": actor_s,
        "actor_vs_direct": actor_s / direct_s - 1.0,
        "pipeline_beyond_actor": pipeline_s / actor_s - 1.0,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
    }
    print(f"{'':22}{'direct':>12}{'pipeline':>12}")
    print(f"{'documents/s':22}{rows['direct_documents_per_s']:12.3f}{rows['pipeline_documents_per_s']:12.3f}")
    print(f"{'tokens/s':22}{rows['direct_tokens_per_s']:12.0f}{rows['pipeline_tokens_per_s']:12.0f}")
    print(f"{'seconds':22}{direct_s:12.2f}{pipeline_s:12.2f}")
    print(f"pipeline overhead vs model time: {100 * rows['overhead_vs_model_time']:+.1f}% "
          f"({len(docs)} documents x {args.max_tokens} tokens, {args.threads} threads)")
    print(f"  of which the model in the actor vs direct: {100 * rows['actor_vs_direct']:+.1f}% "
          f"({actor_s:.2f} s busy), the pipeline beyond the actor's busy time: "
          f"{100 * rows['pipeline_beyond_actor']:+.1f}%")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
