"""One device, every document learned: which setting reads and learns the most.

- synchronous: the learner reads each document and learns from it in the same forward
  (``StreamLearner.read``, ``processor.learner.synchronous``), the next document tokenized
  meanwhile, as its actor runs it;
- shared: a reader of the learner's versions and the learner fed by it, in two processes on the
  one device, as two Ray actors with fractional ``num_gpus`` (or CPUs) are: the reader hands each
  document's hidden states below the adapters and its ids to the learner (pickled, through a
  queue's pipe: a copy more than Ray's object store makes, in shared memory), and the time is until
  the learner has learned the last one. The reader reads every document with one version (a
  version's values do not change what reading costs).

Both against the static scorer (TTT off, full logits, cross-entropy) on the same documents and
device, in this process. Every document's time counts (not a median). Three processes share the
device, so each gives its allocator's cache back after its part of a round (the static scorer's
full logits at 32k tokens take ~50 GiB with the loss); none does inside another's timed part, and
each reads one untimed document after it (its cache refilled) before its timed part. Random
weights of the preset's shape, as ``bench/reader.py``:

    python bench/shared_device.py --preset qwen3-0.6b --device cuda --dtype bfloat16 \\
        --lengths 2048 8192 32768 --chunk 1024 --layers 0 6 12 18 24 --documents 12 --json out.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import queue
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from actors.learner import StreamLearner
from bench.reader import slow_settings, static_score, sync, text_of_length, write_model
from bench.ttt_forward import add_model_arguments
from pipeline.processing.actor_specs import standalone_reader_spec


DONE_TIMEOUT_S = 600.0  # a round's wait for the learner (a child that died never answers)


def spec(args, model: str, **overrides):
    return standalone_reader_spec(model_path=model, base_loss_sample_rate=0.0, device=args.device, dtype=args.dtype,
                                  scope="global", slow=slow_settings(args.config, [])["slow+fast"],
                                  max_document_tokens=2 * max(args.lengths), tokenize_ahead=True, **overrides)


def release_cached(device: str) -> None:
    """Give the allocator's cached blocks back (between timed parts: see the module's docstring)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def primer(task: DocumentTask) -> DocumentTask:
    """An untimed document of ``task``'s text, read after a cache was given back."""
    return replace(task, id=f"{task.id}-primer", offset=task.offset + 50)


def read_ahead(reader: DocumentReader, tasks: list[DocumentTask], read) -> None:
    """``read(task)`` for each task in order, the next tokenized meanwhile (as the actors run)."""
    reader.prepare(tasks[0])
    for i, task in enumerate(tasks):
        nxt = threading.Thread(target=reader.prepare, args=(tasks[i + 1],)) if i + 1 < len(tasks) else None
        if nxt is not None:
            nxt.start()
        read(task)
        if nxt is not None:
            nxt.join()


def reader_process(args, model: str, rounds: list[list[DocumentTask]], handed, ready, start, finished,
                   released) -> None:
    reader = DocumentReader(spec(args, model, slow_from_learner=True, split_at_adapters=True), name="shared-reader")
    version = reader.slow.new_state().version(0)  # the base model's: reading costs the same

    def read(task: DocumentTask) -> None:
        outcome = reader.process(task, version)
        assert outcome.ok, f"{task.id}: {outcome.reason}"
        # Pickled to bytes, as Ray's object store holds it (not torch's shared memory, whose
        # tensors die with this process).
        handed.put(pickle.dumps((task, reader.take_handed(task.id))))

    ready.wait()
    for tasks in rounds:
        reader.prepare(primer(tasks[0]))
        read(primer(tasks[0]))
        start.wait()
        read_ahead(reader, tasks, read)
        finished.wait()  # the learner's timed part is over
        release_cached(args.device)
        released.wait()


def learner_process(args, model: str, rounds: list[list[DocumentTask]], handed, done, ready, start, finished,
                    released) -> None:
    learner = StreamLearner(spec(args, model), name="shared-learner")

    def learn() -> None:
        # Only bytes this bench's own reader process wrote (as Ray unpickles an object store's).
        task, below = pickle.loads(handed.get())
        assert below is not None and below.ids is not None, f"{task.id}: nothing handed on"
        report = learner.learn(task, below)
        assert report["ok"] and report["reason"] is None, f"{task.id}: not learned ({report['reason']})"

    ready.wait()
    for tasks in rounds:
        learn()  # the primer
        sync(torch.device(args.device))
        start.wait()
        for _ in tasks:
            learn()
        sync(torch.device(args.device))
        done.put(time.perf_counter())
        finished.wait()
        release_cached(args.device)
        released.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, dtype="float32", lengths=[2048, 8192], chunk=1024)
    parser.add_argument("--documents", type=int, default=8, help="timed documents per length (after one warm-up round)")
    parser.add_argument("--config", default="configs/local.yaml", help="where the embedded default's slow settings are")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    ctx = mp.get_context("spawn")

    with tempfile.TemporaryDirectory() as tmp:
        write_model(args.preset, getattr(torch, args.dtype), args.chunk, args.layers, Path(tmp))
        synchronous = StreamLearner(spec(args, tmp), name="synchronous")
        tokenizer = synchronous.reader.tokenizer
        gen = torch.Generator().manual_seed(1)
        # Per length, a warm-up round of the timed round's texts (under other ids), then the timed
        # round: every process has met every shape once (a cuDNN plan, a graph's capture, the
        # allocator's blocks), as a long stream has, and no setting pays those where another does not.
        rounds = []
        for length in args.lengths:
            texts = [text_of_length(tokenizer, length, gen) for _ in range(args.documents)]
            rounds += [[DocumentTask(f"{length}-{r}-{i}", text, partition=0, offset=1000 * length + 100 * r + i)
                        for i, text in enumerate(texts)] for r in (0, 1)]
        handed, done = ctx.Queue(), ctx.Queue()
        ready, start, released = ctx.Barrier(3), ctx.Barrier(3), ctx.Barrier(3)
        finished = ctx.Barrier(2)  # the reader and the learner: the learner's timed part is over
        processes = [ctx.Process(target=reader_process,
                                 args=(args, tmp, rounds, handed, ready, start, finished, released)),
                     ctx.Process(target=learner_process,
                                 args=(args, tmp, rounds, handed, done, ready, start, finished, released))]
        for p in processes:
            p.daemon = True  # gone with this process, whatever it raised
            p.start()
        ready.wait(timeout=DONE_TIMEOUT_S)  # both have loaded their models
        rows = []
        for r, tasks in enumerate(rounds):
            start.wait(timeout=DONE_TIMEOUT_S)
            begin = time.perf_counter()
            try:
                shared_s = done.get(timeout=DONE_TIMEOUT_S) - begin
            except queue.Empty:
                raise RuntimeError(f"the learner did not finish round {r} in {DONE_TIMEOUT_S:.0f} s "
                                   f"(exit codes {[p.exitcode for p in processes]})") from None
            released.wait(timeout=DONE_TIMEOUT_S)  # the two others gave their caches back
            tokens = sum(len(tokenizer(t.text, add_special_tokens=False)["input_ids"]) for t in tasks)

            # The two others with the device to themselves, one after the other, each after a primer.
            def read(task: DocumentTask) -> None:
                outcome = synchronous.read(task)
                assert outcome.ok, f"{task.id}: {outcome.reason}"

            synchronous.reader.prepare(primer(tasks[0]))
            read(primer(tasks[0]))
            sync(device)
            begin = time.perf_counter()
            read_ahead(synchronous.reader, tasks, read)
            sync(device)
            synchronous_s = time.perf_counter() - begin
            release_cached(args.device)
            static_s = 0.0
            for k, task in enumerate(tasks):
                ids = torch.tensor(tokenizer(task.text, add_special_tokens=False)["input_ids"], device=device)[None]
                if k == 0:
                    static_score(synchronous.reader.model, ids)  # the primer
                sync(device)
                begin = time.perf_counter()
                static_score(synchronous.reader.model, ids)
                sync(device)
                static_s += time.perf_counter() - begin
            release_cached(args.device)
            if r % 2 == 0:
                continue  # the warm-up round
            length = args.lengths[r // 2]
            row = {"tokens": length, "documents": len(tasks), "static tok/s": tokens / static_s,
                   "synchronous tok/s": tokens / synchronous_s, "shared tok/s": tokens / shared_s,
                   "synchronous / static": static_s / synchronous_s, "shared / static": static_s / shared_s}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for p in processes:
            p.join(timeout=60)
            if p.exitcode != 0:
                raise RuntimeError(f"{p.name} exited with {p.exitcode}")

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{args.preset} {args.dtype} on {name}: tokens | static tok/s | synchronous | shared (reader + fed learner)")
    for r in rows:
        print(f"{r['tokens']} | {r['static tok/s']:.0f} | {r['synchronous tok/s']:.0f} ({r['synchronous / static']:.3f}x) | "
              f"{r['shared tok/s']:.0f} ({r['shared / static']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
