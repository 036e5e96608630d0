"""``ttt-stream feed``: put documents on a topic from files, folders, JSONL or stdin.

- a ``.jsonl`` file, or stdin (``-``): one message per non-empty line, sent as it is (so a
  malformed line reaches the processor and its dead-letter topic, as it would in production);
  a line that is a JSON object with a string ``key`` is keyed by it;
- any other file: one document ``{"id": <path>, "text": <contents>}``;
- a folder: every file below it, in sorted order (``.jsonl`` files line by line).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from kafka import KafkaProducer

from pipeline.config import KafkaConfig


@dataclass(frozen=True)
class FeedMessage:
    value: bytes
    key: bytes | None


def _key_of(line: bytes) -> bytes | None:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    key = doc.get("key") if isinstance(doc, dict) else None
    return key.encode() if isinstance(key, str) else None


def _jsonl(stream: IO[bytes]) -> Iterator[FeedMessage]:
    for line in stream:
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield FeedMessage(line, _key_of(line))


def feed_messages(path: str | Path, stdin: IO[bytes] | None = None) -> Iterator[FeedMessage]:
    """The messages ``ttt-stream feed PATH`` sends, in order."""
    if str(path) == "-":
        yield from _jsonl(stdin if stdin is not None else sys.stdin.buffer)
        return
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".jsonl":
            with open(file, "rb") as f:
                yield from _jsonl(f)
        else:
            doc_id = str(file.relative_to(path)) if path.is_dir() else file.name
            text = file.read_bytes().decode("utf-8", errors="replace")
            yield FeedMessage(json.dumps({"id": doc_id, "text": text}).encode(), None)


def feed(config: KafkaConfig, topic: str, messages: Iterator[FeedMessage], progress: bool = True,
         limit: int | None = None) -> int:
    """Send ``messages`` to ``topic``; return how many the broker acknowledged."""
    from tqdm import tqdm

    producer = KafkaProducer(
        bootstrap_servers=config.bootstrap_servers, **{"acks": "all", **config.producer_settings()}
    )
    futures = []
    try:
        with tqdm(total=limit, unit="doc", desc=f"feed {topic}", disable=not progress) as bar:
            for i, message in enumerate(messages):
                if limit is not None and i >= limit:
                    break
                futures.append(producer.send(topic, value=message.value, key=message.key))
                bar.update(1)
        producer.flush()
    finally:
        producer.close(timeout=10)
    failed = [f for f in futures if f.failed()]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(futures)} messages were not acknowledged: {failed[0].exception}")
    return len(futures)
