"""Tokens/s through the stream worker (``DocumentReader.process``) against the model alone.

Three ways to read the same documents with the same model object, interleaved document by
document in one process, so that their ratios are side by side:

- worker: ``DocumentReader.process`` (tokenize, pick the scope's state, score every chunk with
  the fast weights of the chunks before it, learn, report norms and delta ratios);
- worker, tokenizing ahead: the same while another thread tokenizes the next document
  (``DocumentReader.prepare``, as the Ray actor does), the wait for it included;
- static scorer: TTT off, one forward with full logits, then cross-entropy over every position
  (what scoring a document costs without TTT);
- prefill: In-Place TTT on, ``logits_to_keep=1`` (what bench/ttt_forward.py times: the model's
  own speed, no scoring);
- with ``--slow``: workers that also learn slow weights (the embedded default's settings, with
  and without rehearsal, and ``--slow-variant``s), and a reader of a learner's version; all
  timed as the actor runs them, tokenizing the next document meanwhile.

The model has the preset's shape and random weights (TTT parameters drawn small but non-zero),
saved with the shipped model's tokenizer to a temporary directory that the worker loads like any
model path. Documents are random token ids decoded to text; the reported token counts are the
worker's own. With ``--profile`` the worker's time on one document is broken down by operator.

    python bench/reader.py --preset small --device cpu --lengths 2048 8192               # CPU table
    python bench/reader.py --preset qwen3-0.6b --device cuda --dtype bfloat16 \\
        --lengths 2048 8192 32768 --chunk 1024 --layers 0 6 12 18 24 --profile          # the GPU table
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from pipeline.processing.actor_specs import standalone_reader_spec
from actors.learner import StreamLearner
from bench.ttt_forward import PRESETS, add_model_arguments
from ttt_model import FastWeightState, TTTConfig, enable_ttt, ttt_forward
from ttt_model.model.patch import static_mode
from ttt_model.model.state import ttt_layers

TOKENIZER = Path(__file__).resolve().parent.parent / "models" / "ttt-tiny-qwen3"
# A reader of the learner's versions (actors.learner): reads with fixed slow weights, learns
# nothing; timed as the actor runs it, tokenizing the next document meanwhile.
READER = "reader of a learner's version, tokenizing ahead"
# The learner itself (actors.learner.StreamLearner.learn): reads a document with slow steps and
# publishes the next version; as the actor runs it, tokenizing the next document meanwhile.
LEARNER = "learner"
# The learner fed by the reader (as in a stream): it takes the hidden states the reader of the
# same document computed below the lowest adapted layer, and the ids it read, and runs the
# adapted layers and the head.
FED = "learner, fed by the reader"


def write_model(preset: str, dtype: torch.dtype, chunk: int, layers: list[int] | None, out: Path) -> None:
    torch.manual_seed(0)
    config = Qwen3Config(**PRESETS[preset])
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    enable_ttt(model, TTTConfig(layers=layers, chunk_size=chunk))
    with torch.no_grad():  # trained-looking TTT parameters: a zero conv would skip the updates
        for mlp in ttt_layers(model).values():
            mlp.ttt_conv.weight.normal_(0, 0.02)
    model.save_pretrained(out)
    for f in TOKENIZER.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


def text_of_length(tokenizer, length: int, gen: torch.Generator) -> str:
    """Random text that the tokenizer reads back as exactly ``length`` tokens (where it can), so
    that every document of a row has one shape."""
    ids = torch.randint(0, len(tokenizer), (length,), generator=gen).tolist()
    text = tokenizer.decode(ids)
    for _ in range(8):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == length:
            break
        if len(ids) < length:
            ids += torch.randint(0, len(tokenizer), (length - len(ids),), generator=gen).tolist()
        text = tokenizer.decode(ids[:length])
    return text


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def static_score(model, ids: torch.Tensor) -> torch.Tensor:
    """TTT off: full logits, then the NLL of every next token (fp32 cross-entropy); ``ids`` is
    (batch, tokens)."""
    with torch.no_grad(), static_mode(model):
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")


def prefill(model, ids: torch.Tensor) -> None:
    with torch.no_grad(), ttt_forward(state=FastWeightState.for_model(model)):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def profile_worker(read, device: torch.device, top: int = 25) -> dict[str, list[dict]]:
    """The time of ``read()`` (a worker's process or process_batch call, or the static scorer) by
    operator: on the device, and on the host (where a short document on a GPU spends its time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        read()
        sync(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()

    def by(key: str) -> list[dict]:
        busy = sum(getattr(e, key) for e in averages) / 1000
        events = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:top]
        # Wall time far above the device's busy time: the host (Python, launches, syncs) is the bound.
        return [{"op": "(wall, profiled)", "calls": 1, "self_ms": wall * 1000},
                {"op": "(sum over operators)", "calls": 1, "self_ms": busy},
                *({"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1000} for e in events)]

    return {"device": by("self_device_time_total") if device.type == "cuda" else [],
            "host": by("self_cpu_time_total")}


def max_relative_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest ||got - want|| / ||want|| over pairs of tensors (``want`` in float64)."""
    return max(float((g.double() - w).norm() / w.norm().clamp_min(1e-30)) for g, w in zip(got, want))


def rehearsal_graph_check(worker: DocumentReader) -> dict | None:
    """A rehearsal's gradient replayed from its CUDA graph against the same run eagerly, for the
    worker's state now, on a few chunks and both loss scales a step gives it: the largest
    relative difference (None without rehearsal). On a CPU both run eagerly."""
    from ttt_model.slow.rehearsal_graph import RehearsalGraph, graphs_available

    learner = worker.slow
    if learner.rehearsal is None:
        return None
    state = worker.mode.states.get(None).state.slow
    eager = RehearsalGraph(learner, state, learner._rehearsal_hidden, capture=False)
    graphed = RehearsalGraph(learner, state, learner._rehearsal_hidden, capture=graphs_available(worker.device))
    worst, again = 0.0, 0.0
    for index in (0, 1, learner.rehearsal.shape[0] - 1):
        for extra in (1, 2):
            scale = 1.0 / ((learner.rehearsal.shape[1] - 1) * (1 + extra))
            want = [g.double().clone() for g in eager.grads(state, index, scale)]
            # The eager run twice: what the device's own kernels vary by (atomics in the backward).
            again = max(again, max_relative_difference(eager.grads(state, index, scale), want))
            got = graphed.grads(state, index, scale)
            if got is None:
                return {"captured": False, "failure": graphed.failed}
            worst = max(worst, max_relative_difference(got, want))
    return {"captured": graphed.capture, "graphs": len(graphed.graphs), "max relative difference": worst,
            "eager twice, max relative difference": again,
            **({"a failed capture": failed_capture_check(learner, state, eager, again)} if graphed.capture else {})}


def failed_capture_check(learner, state, eager, again: float) -> dict:
    """A capture made to fail (a read back to the host inside it, which a capture forbids): the
    graph says so and gives None (its learner rehearses eagerly), the thread's stream is the one
    it was before, the device still gives the eager gradient it gave before (within what the
    eager run varies by, ``again``), and the allocator can still give its cache back (an
    allocation past the free memory, with as much cached). No CI has a GPU to run this path."""
    from ttt_model.slow.rehearsal_graph import RehearsalGraph

    broken = RehearsalGraph(learner, state, learner._rehearsal_hidden, capture=True)
    run = broken._run

    def reads_back_while_capturing(scale: float) -> list[torch.Tensor]:
        out = run(scale)
        if torch.cuda.is_current_stream_capturing():
            out[0].sum().item()
        return out

    broken._run = reads_back_while_capturing
    scale = 1.0 / (learner.rehearsal.shape[1] - 1)
    want = [g.double().clone() for g in eager.grads(state, 0, scale)]
    before = torch.cuda.current_stream()
    got = broken.grads(state, 0, scale)
    stream_kept = torch.cuda.current_stream() == before
    after = eager.grads(state, 0, scale)
    difference = max_relative_difference(after, want)
    free, _ = torch.cuda.mem_get_info()
    cached = torch.empty(int(0.6 * free), dtype=torch.uint8, device="cuda")
    del cached  # cached now, not free: the next one fits only if the allocator releases it
    try:
        past = torch.empty(int(0.8 * free), dtype=torch.uint8, device="cuda")
        del past
        cache_released = True
    except torch.OutOfMemoryError:
        cache_released = False
    torch.cuda.empty_cache()
    result = {"graph gave none": got is None, "failure": broken.failed, "stream as before": stream_kept,
              "eager after it, max relative difference": difference, "allocator released its cache": cache_released}
    assert got is None and broken.failed and stream_kept and difference <= again + 1e-6 and cache_released, result
    return result


def slow_settings(config: str, variants: list[str]) -> dict[str, dict]:
    """The embedded default's slow-weight settings (``model.slow`` of ``config``), without
    rehearsal, and the given variants."""
    from bench.domain_stream import parse_overrides
    from pipeline.config import load_config

    default = {**load_config(config, environ={}).model.slow.model_dump(), "enabled": True}
    settings = {"slow+fast": default, "slow+fast, no rehearsal": {**default, "rehearsal_path": None}}
    for variant in variants:
        label, _, pairs = variant.partition(":")
        settings[label] = {**default, **parse_overrides([p for p in pairs.split(";") if p])}
    return settings


def paired(times: list[float], static: list[float]) -> tuple[float, float]:
    """Over consecutive pairs of documents: the median of static time / ``times`` for the pair,
    and the median time per document of a pair."""
    pairs = [(static[i] + static[i + 1], times[i] + times[i + 1]) for i in range(0, len(times) - 1, 2)]
    if not pairs:  # one timed document: it alone (a slow step with or without rehearsal)
        pairs = [(2 * static[0], 2 * times[0])]
    return statistics.median(s / t for s, t in pairs), statistics.median(t / 2 for _, t in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, dtype="float32", lengths=[2048, 8192], chunk=1024)
    parser.add_argument("--scope", default="global", choices=["global", "per_document"])
    parser.add_argument("--documents", type=int, default=5, help="timed documents per length")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--jitter", type=int, default=0,
                        help="document i has length + (37 i mod jitter) tokens: every one a length of its own, as in "
                             "a real stream (attention kernels that plan per shape pay for each new one)")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="SDPA without its cuDNN backend (flash attention instead), for every row")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--batch", type=int, default=0,
                        help="also: per_document scope, this many documents per process_batch vs one at a time")
    parser.add_argument("--batch-lengths", type=int, nargs="+", default=[2048],
                        help="document lengths of the --batch comparison (its logits are batch x length x vocab)")
    parser.add_argument("--slow", action="store_true",
                        help="also: workers with slow weights (the embedded default's settings from --config, with "
                             "and without rehearsal), each timed beside the others on the same documents")
    parser.add_argument("--slow-variant", action="append", default=[], metavar="LABEL:KEY=VALUE;...",
                        help="with --slow, one more slow-weight worker: the default's settings with these overrides")
    parser.add_argument("--config", default="configs/local.yaml", help="where the embedded default's slow settings are")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)

    with tempfile.TemporaryDirectory() as tmp:
        write_model(args.preset, getattr(torch, args.dtype), args.chunk, args.layers, Path(tmp))
        worker = DocumentReader(standalone_reader_spec(model_path=tmp, base_loss_sample_rate=0.0, device=args.device, dtype=args.dtype, scope=args.scope,
                                           max_document_tokens=2 * max(args.lengths), tokenize_ahead=True),
                                name="bench")
        model, tokenizer = worker.model, worker.tokenizer
        slow_workers = {}
        if args.slow:
            for label, slow in slow_settings(args.config, args.slow_variant).items():
                slow_workers[label] = DocumentReader(
                    standalone_reader_spec(model_path=tmp, base_loss_sample_rate=0.0, device=args.device, dtype=args.dtype, scope=args.scope, slow=slow,
                               max_document_tokens=2 * max(args.lengths), tokenize_ahead=True), name=f"bench-{label}")
        reader, version, learner, fed = None, None, None, None
        if slow_workers:
            # The learner's readers: the default's adapters, read with a fixed version (the first
            # slow worker's state, once the warm-up documents have trained it).
            default = next(iter(slow_workers.values()))
            reader = DocumentReader(standalone_reader_spec(model_path=tmp, base_loss_sample_rate=0.0, device=args.device, dtype=args.dtype, scope="global",
                                               slow=default.slow_config, slow_from_learner=True, split_at_adapters=True,
                                               max_document_tokens=2 * max(args.lengths), tokenize_ahead=True),
                                    name="bench-reader")
            learner, fed = (StreamLearner(standalone_reader_spec(model_path=tmp, base_loss_sample_rate=0.0, device=args.device,
                                                                 dtype=args.dtype, slow=default.slow_config,
                                                                 max_document_tokens=2 * max(args.lengths),
                                                                 tokenize_ahead=True), name=name)
                            for name in ("bench-learner", "bench-learner-fed"))
        gen = torch.Generator().manual_seed(1)
        rows, profiles = [], {}
        for length in args.lengths:
            texts = [text_of_length(tokenizer, length + (37 * i) % args.jitter if args.jitter else length, gen)
                     for i in range(args.warmup + args.documents)]
            times = {"worker": [], "worker, tokenizing ahead": [], "static": [], "prefill": [], "tokenize": [],
                     **{label: [] for label in slow_workers}, **({READER: [], LEARNER: [], FED: []} if reader else {})}
            tokens, skipped = [], []
            ahead = [DocumentTask(f"ahead-{length}-{i}", text) for i, text in enumerate(texts)]
            worker.prepare(ahead[0])
            for i, text in enumerate(texts):
                task = DocumentTask(f"doc-{length}-{i}", text)
                ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], device=device)[None]
                ids = ids[:, : worker.spec.max_document_tokens]

                def pipelined(reads: DocumentReader, version=None) -> None:
                    # As the Ray actor does: the next document is tokenized in another thread
                    # while this one is read (this one was tokenized during the previous read).
                    nxt = threading.Thread(target=reads.prepare, args=(ahead[(i + 1) % len(ahead)],))
                    nxt.start()
                    reads.process(ahead[i], version)
                    nxt.join()

                sample = {
                    "worker": timed(lambda: worker.process(task), device),
                    "worker, tokenizing ahead": timed(lambda: pipelined(worker), device),
                }
                if reader is not None:  # right after the fast worker: the same conditions
                    if version is None:
                        version = next(iter(slow_workers.values())).mode.states.get(None).state.slow.version(1)
                    reader.prepare(ahead[i])
                    sample[READER] = timed(lambda: pipelined(reader, version), device)
                for label, w in slow_workers.items():
                    # Slow weights: the whole document read and learned from, as the actor runs it.
                    w.prepare(ahead[i])
                    sample[label] = timed(lambda: pipelined(w), device)
                if learner is not None:
                    # As LearnerActor runs it: the next document tokenized in another thread
                    # (``prepare``), except where its reader hands the ids on with the states.
                    learner.reader.prepare(ahead[i])

                    def learning() -> None:
                        nxt = threading.Thread(target=learner.reader.prepare, args=(ahead[(i + 1) % len(ahead)],))
                        nxt.start()
                        learner.learn(ahead[i])
                        nxt.join()

                    sample[LEARNER] = timed(learning, device)
                    handed = reader.take_handed(ahead[i].id)
                    if handed is None:  # past what a hand-off holds (MAX_HANDED_BYTES): not a fed step
                        print(f"{task.id}: {ids.shape[1]} tokens, nothing handed on; the document is left out",
                              flush=True)
                        skipped.append(task.id)
                        continue
                    sample[FED] = timed(lambda: fed.learn(ahead[i], handed), device)
                sample |= {
                    "static": timed(lambda: static_score(model, ids), device),
                    "prefill": timed(lambda: prefill(model, ids), device),
                    "tokenize": timed(lambda: tokenizer(text, add_special_tokens=False), device),
                }
                if i >= args.warmup:
                    tokens.append(ids.shape[1])
                    for k, v in sample.items():
                        times[k].append(v)
            median = {k: statistics.median(v) for k, v in times.items()}
            n = statistics.median(tokens)
            # Slow steps alternate with and without rehearsal: they are compared by pairs of
            # documents (one rehearsed step each), each pair's time against the static scorer's
            # on the same two documents, and the median pair taken.
            learning = [*slow_workers, *([LEARNER, FED] if learner else [])]
            pairs = {k: paired(times[k], times["static"]) for k in learning}
            row = {"tokens": n, **{f"{k} ms": 1000 * v for k, v in median.items()},
                   **{f"{k} tok/s": n / v for k, v in median.items()},
                   "worker / static": median["static"] / median["worker"],
                   "worker / (tokenize + static)": (median["tokenize"] + median["static"]) / median["worker"],
                   "worker tokenizing ahead / static": median["static"] / median["worker, tokenizing ahead"],
                   "worker / prefill": median["prefill"] / median["worker"],
                   **{f"{label} / static": median["static"] / median[label] for label in [*slow_workers, *([READER] if reader else [])]},
                   **{f"{label} pairs ms": 1000 * pairs[label][1] for label in learning},
                   **{f"{label} pairs / static": pairs[label][0] for label in learning},
                   # With its own device, the learner keeps up with one reader of a version when
                   # it learns from one document in this many (processor.learner.every).
                   **({"learner every": math.ceil(pairs[LEARNER][1] / median[READER]),
                       "learner fed every": math.ceil(pairs[FED][1] / median[READER] - 1e-9),
                       # Tokens/s of the learner fed by the reader over the reader's: >= 1 keeps up.
                       "learner fed / reader": median[READER] / pairs[FED][1],
                       "learner / reader": median[READER] / pairs[LEARNER][1]} if learner else {}),
                   "per document ms": {k: [round(1000 * t, 3) for t in v] for k, v in times.items()},
                   **({"documents left out (nothing handed on)": skipped} if skipped else {})}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile:
                task = DocumentTask(f"profile-{length}", texts[0])
                profiles[str(length)] = profile_worker(lambda: worker.process(task), device)
                profiles[f"{length}, static scorer"] = profile_worker(lambda: static_score(model, ids), device)
                if slow_workers:  # one document with the default's slow steps; one read with a version
                    profiles[f"{length}, slow+fast"] = profile_worker(lambda: default.process(task), device)
                    profiles[f"{length}, {READER}"] = profile_worker(lambda: reader.process(task, version), device)
                if learner is not None:  # the learner of the same document, fed what its reader computed
                    handed = reader.take_handed(task.id)
                    assert handed is not None
                    profiles[f"{length}, {FED}"] = profile_worker(lambda: fed.learn(task, handed), device)

        batched = []
        if args.batch:
            per_doc = DocumentReader(standalone_reader_spec(model_path=tmp, base_loss_sample_rate=0.0, device=args.device, dtype=args.dtype, scope="per_document",
                                                max_document_tokens=2 * max(args.batch_lengths),
                                                batch_tokens=args.batch * (max(args.batch_lengths) + 1024),
                                                tokenize_ahead=True),
                                     name="bench-batch")
            for length in args.batch_lengths:
                texts = [text_of_length(tokenizer, length, gen) for _ in range(args.batch)]
                runs = {"one at a time": [], "batched": [], "static, batched": []}
                batch_ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"][:length] for t in texts],
                                         device=device)
                for r in range(args.warmup + args.documents):
                    tasks = [DocumentTask(f"b{length}-{r}-{i}", t) for i, t in enumerate(texts)]
                    for t in tasks:
                        per_doc.prepare(t)  # tokenizing is not what is compared here
                    one = timed(lambda: [per_doc.process(t) for t in tasks], device)
                    tasks = [DocumentTask(f"c{length}-{r}-{i}", t) for i, t in enumerate(texts)]
                    for t in tasks:
                        per_doc.prepare(t)
                    many = timed(lambda: per_doc.process_batch(tasks), device)
                    # The same batch without TTT, one forward: what batching can reach at best.
                    static = timed(lambda: static_score(model, batch_ids), device)
                    if r >= args.warmup:
                        runs["one at a time"].append(one)
                        runs["batched"].append(many)
                        runs["static, batched"].append(static)
                median = {k: statistics.median(v) for k, v in runs.items()}
                row = {"tokens": length, "documents": args.batch,
                       **{f"{k} tok/s": args.batch * length / v for k, v in median.items()},
                       "batched / one at a time": median["one at a time"] / median["batched"],
                       "batched / static batched": median["static, batched"] / median["batched"]}
                batched.append(row)
                print(json.dumps(row), flush=True)
                if args.profile:
                    tasks = [DocumentTask(f"p{length}-{i}", t) for i, t in enumerate(texts)]
                    for t in tasks:
                        per_doc.prepare(t)
                    profiles[f"{args.batch} x {length}, batched"] = profile_worker(
                        lambda: per_doc.process_batch(tasks), device)
                    profiles[f"{args.batch} x {length}, static batched"] = profile_worker(
                        lambda: static_score(model, batch_ids), device)

        graph_check = rehearsal_graph_check(next(iter(slow_workers.values()))) if slow_workers else None

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{args.preset} {args.dtype} on {name}, chunk {args.chunk}, TTT layers {sorted(ttt_layers(model))}, "
          f"scope {args.scope}, median of {args.documents} documents")
    print("tokens | worker tok/s (ms) | worker tokenizing ahead tok/s (ms) | static tok/s (ms) | prefill tok/s (ms) | "
          "tokenize ms | worker/static | worker tokenizing ahead/static | worker/(tokenize+static) | worker/prefill")
    for r in rows:
        print(f"{r['tokens']:.0f} | {r['worker tok/s']:.0f} ({r['worker ms']:.1f}) | "
              f"{r['worker, tokenizing ahead tok/s']:.0f} ({r['worker, tokenizing ahead ms']:.1f}) | "
              f"{r['static tok/s']:.0f} ({r['static ms']:.1f}) | {r['prefill tok/s']:.0f} ({r['prefill ms']:.1f}) | "
              f"{r['tokenize ms']:.1f} | {r['worker / static']:.2f}x | {r['worker tokenizing ahead / static']:.2f}x | "
              f"{r['worker / (tokenize + static)']:.2f}x | {r['worker / prefill']:.2f}x")
    if slow_workers:
        print("\nslow weights, tok/s and x the static scorer (slow steps: median pair of documents; all but the "
              "static scorer and the learner tokenizing ahead):")
        print("tokens | static | fast only | " + " | ".join(f"{x}" for x in [*slow_workers, READER, LEARNER])
              + " | documents per learned one, to keep up with one reader")
        for r in rows:
            print(f"{r['tokens']:.0f} | {r['static tok/s']:.0f} | "
                  f"{r['worker, tokenizing ahead tok/s']:.0f} ({r['worker tokenizing ahead / static']:.3f}x) | "
                  + " | ".join(f"{r['tokens'] / r[f'{label} pairs ms'] * 1000:.0f} ({r[f'{label} pairs / static']:.3f}x)"
                               for label in slow_workers)
                  + f" | {r[f'{READER} tok/s']:.0f} ({r[f'{READER} / static']:.3f}x)"
                  + f" | {r['tokens'] / r[f'{LEARNER} pairs ms'] * 1000:.0f} ({r[f'{LEARNER} pairs / static']:.3f}x)"
                  + f" | {r['learner every']}")
        for label, w in slow_workers.items():
            print(f"  {label}: {w.slow_config.model_dump_json()}")
    if batched:
        print(f"\nper_document scope, {args.batch} documents per process_batch vs one at a time (tokenized ahead):")
        print("tokens | one at a time tok/s | batched tok/s | static batched tok/s | batched / one at a time | "
              "batched / static batched")
        for r in batched:
            print(f"{r['tokens']} | {r['one at a time tok/s']:.0f} | {r['batched tok/s']:.0f} | "
                  f"{r['static, batched tok/s']:.0f} | {r['batched / one at a time']:.2f}x | "
                  f"{r['batched / static batched']:.2f}x")
    for length, sides in profiles.items():
        for side, ops in sides.items():
            print(f"\nprofile, {length} tokens, {side} (self time by operator):")
            for op in ops[:14]:
                print(f"  {op['self_ms']:9.2f} ms  {op['calls']:6d}x  {op['op'][:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows, "batched": batched, "profiles": profiles,
                       "rehearsal graph check": graph_check,
                       "slow": {label: w.slow_config.model_dump() for label, w in slow_workers.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
