"""What the admission checks and the promotion gate buy: a domain stream, clean and with 30% junk.

    python bench/learning_admission.py --domain pandas --every 3 --out bench/results/learning_admission.json

The stream is a domain the shipped model never saw (``bench/domain_stream.py`` builds it), its
documents cut to ``--max-tokens``. The poisoned stream inserts junk among them, spread evenly,
``--junk`` of the whole: spam (a phrase repeated), random characters, near-copies of one document,
and one tenant's flood of word salad (random words of the domain, under one key, which the text
checks cannot tell from prose: the key share and the outlier loss catch it). Every document has
a key (``tenant-<i mod 4>``; the flood's ``flood``).

Each setting drives the stream's own parts in the ledger's order, without Ray or Kafka: the
driver's decisions (``LearningAdmission``, the held-out slice by ``TenantKeys.draw`` with a fixed
salt) and the learner (``StreamLearner`` with ``every``, its gate judging a checkpoint every
``--checkpoint-every`` documents). ``live`` is the last version the gate promoted (gate off: the
last one). Reported per setting, token-weighted, each text read as a new document (fresh fast
weights, the slow weights of the version, as the pyfunc scores):

- held-out gain: the domain's held-out documents under ``live`` against the base model;
- forgetting: the shipped held-out corpus (the model's own kind of text) under ``live`` against
  the base model;
- learner time: seconds spent learning, and the share of it spent on junk;
- verdicts of the gate, and documents learned / held out / kept out by reason.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from actors.call_types import DocumentTask
from actors.learner import StreamLearner
from bench.domain_stream import prepare
from pipeline.config import AdmissionConfig, GateConfig
from pipeline.processing.actor_specs import standalone_reader_spec
from pipeline.processing.learning_admission import LearningAdmission, decision_kind
from pipeline.state.tenant_keys import TenantKeys


def junk_documents(stream: list, count: int, rng: random.Random, max_chars: int) -> list[tuple[str, str, str]]:
    """(kind, key, text) of ``count`` junk documents: four kinds in turn."""
    words = [w for doc in stream for w in doc.text.split()]
    copied = stream[0].text
    out = []
    for i in range(count):
        kind = ("spam", "random", "near-copy", "flood")[i % 4]
        if kind == "spam":
            text = ("Limited offer: buy now and save 90% on every license! " * 200)[:max_chars]
        elif kind == "random":
            text = "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation + " ")
                           for _ in range(max_chars // 2))
        elif kind == "near-copy":
            cut = rng.randrange(len(copied) // 4, len(copied) // 2)
            text = copied[:cut] + f" ({i}) " + copied[cut:]
        else:
            text = " ".join(rng.choice(words) for _ in range(max_chars // 6))
        out.append((kind, "flood" if kind == "flood" else f"junk-{i % 3}", text))
    return out


def build_stream(stream: list, junk: float, seed: int, max_chars: int) -> list[tuple[str, str, str, str]]:
    """(id, kind, key, text) in stream order: the domain's documents with junk spread among them."""
    rows = [(doc.id, "clean", f"tenant-{i % 4}", doc.text) for i, doc in enumerate(stream)]
    if junk <= 0:
        return rows
    count = round(junk * len(rows) / (1 - junk))
    bad = iter(junk_documents(stream, count, random.Random(seed), max_chars))
    total = len(rows) + count
    junk_at = {int((k + 0.5) * total / count) for k in range(count)}  # evenly spread, distinct (count < total)
    clean = iter(rows)
    out = []
    for position in range(total):
        if position in junk_at:
            kind, key, text = next(bad)
            out.append((f"junk-{position}", kind, key, text))
        else:
            out.append(next(clean))
    return out


def run_setting(spec, rows, every: int, checks: bool, gate: bool, checkpoint_every: int, holdout: float,
                eval_sets: dict[str, list[torch.Tensor]]) -> dict:
    gate_config = GateConfig(enabled=gate, holdout_fraction=holdout)
    admission_config = AdmissionConfig(enabled=checks)
    learner = StreamLearner(spec, lag=1, every=every, gate=gate_config if gate else None,
                            outlier_margin=admission_config.outlier_loss_margin if checks else None)
    admission = LearningAdmission(admission_config) if checks else None
    keys = TenantKeys(b"bench-salt-0000000000000000000000")
    decisions: dict[str, int] = {}
    seconds = {"clean": 0.0, "junk": 0.0}
    learned = {"clean": 0, "junk": 0}
    verdicts = []
    live = learner.reader.mode.states.get(None).state.slow.state_dict()  # the base model's until a version passes
    for n, (doc_id, kind, key, text) in enumerate(rows):
        held_out = gate and keys.draw("held out", 0, n) < holdout
        kept_out = admission.decide(text, key, held_out) if admission is not None else None
        held_out = held_out and kept_out is None
        decision = decision_kind(kept_out, held_out)
        decisions[decision] = decisions.get(decision, 0) + 1
        started = time.perf_counter()
        worth = admission.novelty if admission is not None else None  # as the processor hands it on
        report = learner.learn(DocumentTask(doc_id, text, key, held_out=held_out, kept_out=kept_out, worth=worth))
        label = "clean" if kind == "clean" else "junk"
        if report["tokens"]:
            seconds[label] += time.perf_counter() - started
            learned[label] += 1
        if (n + 1) % checkpoint_every == 0 or n + 1 == len(rows):
            if gate:
                verdict, _ = learner.judge()
                verdicts.append(verdict.verdict)
                if verdict.promoted:
                    live = learner.reader.mode.states.get(None).state.slow.state_dict()
            else:
                live = learner.reader.mode.states.get(None).state.slow.state_dict()
    state = learner.mode.new_state().slow
    state.load_state_dict(live)
    losses = {name: learner_loss(learner, state, docs) for name, docs in eval_sets.items()}
    return {"losses": losses, "decisions": decisions, "verdicts": verdicts, "learner_s": seconds, "learned": learned,
            "outlier_windows": learner.outlier_windows.outliers}


def learner_loss(learner: StreamLearner, state, docs: list[torch.Tensor]) -> float:
    from actors.promotion_gate import PromotionGate

    scorer = PromotionGate(GateConfig(), learner.reader.model, learner.reader.slow, None)
    return scorer.loss(state, docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="pandas")
    parser.add_argument("--data", type=Path, default=Path("data/domains"))
    parser.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=60)
    parser.add_argument("--heldout-documents", type=int, default=24)
    parser.add_argument("--shipped-documents", type=int, default=16)
    parser.add_argument("--shipped-heldout", type=Path, default=Path("data/corpus/heldout.jsonl"))
    parser.add_argument("--junk", type=float, default=0.3)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="clean:on,poisoned:on,poisoned:off,clean:off")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = (yaml.safe_load(args.config.read_text()) or {}).get("model", {})
    root = args.data / args.domain
    if not (root / "stream.jsonl").exists():
        from pipeline.local.corpus import DOMAINS, build_domain

        build_domain(DOMAINS[args.domain], root)
    from transformers import AutoTokenizer

    model_path = model.get("path", "models/ttt-tiny-qwen3")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    stream = prepare(root / "stream.jsonl", tokenizer, args.max_tokens, args.documents, args.seed)
    heldout = prepare(root / "heldout.jsonl", tokenizer, args.max_tokens, args.heldout_documents, -1)
    shipped = prepare(args.shipped_heldout, tokenizer, args.max_tokens, args.shipped_documents, -1)
    ids = lambda docs: [torch.tensor(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs]  # noqa: E731
    eval_sets = {"domain_heldout": ids(heldout), "shipped_heldout": ids(shipped)}
    spec = standalone_reader_spec(model_path=model_path, device=args.device, max_document_tokens=args.max_tokens,
                                  spill_dir="/tmp/ttt-stream-bench-spill", scope="global", deterministic=False,
                                  ttt=dict(model.get("ttt") or {}), slow={**(model.get("slow") or {}), "enabled": True})
    max_chars = max(len(d.text) for d in stream)
    streams = {"clean": build_stream(stream, 0.0, args.seed, max_chars),
               "poisoned": build_stream(stream, args.junk, args.seed, max_chars)}
    result = {"domain": args.domain, "documents": len(stream), "junk": args.junk, "every": args.every,
              "machine": f"{args.device}, {torch.get_num_threads()} threads",
              "max_tokens": args.max_tokens, "checkpoint_every": args.checkpoint_every, "holdout": args.holdout,
              "heldout_documents": len(heldout), "shipped_documents": len(shipped), "settings": {}}
    base = None
    for setting in args.settings.split(","):
        name, switch = setting.split(":")
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        out = run_setting(spec, streams[name], args.every, switch == "on", switch == "on", args.checkpoint_every,
                          args.holdout, eval_sets)
        if base is None:
            learner = StreamLearner(spec, lag=1)
            base = {k: learner_loss(learner, None, v) for k, v in eval_sets.items()}
            result["base"] = base
        out["heldout_gain"] = out["losses"]["domain_heldout"] / base["domain_heldout"] - 1
        out["forgetting"] = out["losses"]["shipped_heldout"] / base["shipped_heldout"] - 1
        total = out["learner_s"]["clean"] + out["learner_s"]["junk"]
        out["learner_share_on_junk"] = out["learner_s"]["junk"] / total if total else 0.0
        out["wall_s"] = time.perf_counter() - started
        out["stream_documents"] = len(streams[name])
        result["settings"][setting] = out
        print(f"{setting:14s} held-out {100 * out['heldout_gain']:+.2f}%  forgetting {100 * out['forgetting']:+.2f}%  "
              f"learned {out['learned']}  learner time on junk {100 * out['learner_share_on_junk']:.0f}%  "
              f"verdicts {out['verdicts']}  decisions {out['decisions']}  ({out['wall_s']:.0f} s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
