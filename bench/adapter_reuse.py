"""Adapter reuse: does a new key gain from starting at the slow weights of the most similar key?

    python bench/adapter_reuse.py --out bench/results/adapter_reuse.json

One per_key reader with the embedded default's slow weights reads two domain streams as two
keys ("pandas", "sphinx": the first ``--warm`` documents of each, interleaved). Then each new key
reads its first ``--new`` documents twice from that same snapshot: with ``reuse_nearest_key``
(its slow weights start as a copy of the nearest key's, by the cosine of the base model's mean
hidden state over the first chunk of its first document) and without (from the base model).
New keys: unseen documents of each domain, and the shipped held-out corpus (a key like neither,
where reuse can only hurt). Reported per new key: the similarity to every warm key, the key it
reused, and the prequential loss (slow + fast) of each of its first documents, both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from domain_stream import parse_overrides, prepare  # noqa: E402

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader  # noqa: E402
from pipeline.processing.actor_specs import standalone_reader_spec  # noqa: E402
from ttt_model.model.patch import ttt_config_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/domains"))
    parser.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    parser.add_argument("--slow", action="append", default=[], help="override a model.slow field: key=value")
    parser.add_argument("--warm", type=int, default=24, help="documents per warm key")
    parser.add_argument("--new", type=int, default=6, help="documents per new key")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--shipped-heldout", type=Path, default=Path("data/corpus/heldout.jsonl"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = (yaml.safe_load(args.config.read_text()) or {}).get("model", {})
    model_path = model.get("path", "models/ttt-tiny-qwen3")
    slow = {**(model.get("slow") or {}), **parse_overrides(args.slow), "enabled": True}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    for domain in ("pandas", "sphinx"):
        if not (args.data / domain / "stream.jsonl").exists():
            from pipeline.local.corpus import DOMAINS, build_domain

            build_domain(DOMAINS[domain], args.data / domain)

    def docs(path: Path, limit: int) -> list:
        return prepare(path, tokenizer, args.max_tokens, limit, -1)

    warm = {d: docs(args.data / d / "stream.jsonl", args.warm) for d in ("pandas", "sphinx")}
    new = {"pandas-new": docs(args.data / "pandas" / "heldout.jsonl", args.new),
           "sphinx-new": docs(args.data / "sphinx" / "heldout.jsonl", args.new),
           "shipped-new": docs(args.shipped_heldout, args.new)}

    def reader(reuse: bool, name: str) -> DocumentReader:
        spec = standalone_reader_spec(model_path=model_path, device=args.device, scope="per_key", ttt=dict(model.get("ttt") or {}),
                          slow={**slow, "reuse_nearest_key": reuse, "reuse_min_similarity": -1.0},
                          max_document_tokens=args.max_tokens, spill_dir=f"/tmp/ttt-stream-bench-reuse/{name}")
        return DocumentReader(spec, name=name)

    started = time.perf_counter()
    reusing, fresh = reader(True, "reuse"), reader(False, "base")
    for i in range(args.warm):
        for key, rows in warm.items():
            if i < len(rows):
                reusing.process(DocumentTask(rows[i].id, rows[i].text, key=key))
    snapshot = reusing.snapshot()
    print(f"warm keys read ({time.perf_counter() - started:.0f} s)", flush=True)

    result = {"slow": slow, "warm_documents": {k: len(v) for k, v in warm.items()}, "new_documents": args.new,
              "max_tokens": args.max_tokens, "keys": {}}
    signatures = reusing.mode.states.signatures()
    for key, rows in new.items():
        ids = torch.tensor(tokenizer(rows[0].text, add_special_tokens=False)["input_ids"], device=reusing.device)[None]
        own = reusing.slow.signature(ids[:, : ttt_config_of(reusing.model).chunk_size])
        similarity = {k: float(torch.nn.functional.cosine_similarity(own, s, dim=0)) for k, s in signatures.items()}
        outcomes = {}
        for label, w in (("reuse", reusing), ("base", fresh)):
            w.restore(snapshot)
            outcomes[label] = [w.process(DocumentTask(d.id, d.text, key=key)) for d in rows]
        losses = {label: [o.loss for o in outs] for label, outs in outcomes.items()}
        tokens = [o.tokens for o in outcomes["base"]]
        mean = {k: sum(v * t for v, t in zip(vs, tokens)) / sum(tokens) for k, vs in losses.items()}
        result["keys"][key] = {"similarity": similarity, "reused_from": outcomes["reuse"][0].reused_from, "loss": losses, "mean": mean,
                               "first_document_gain": losses["reuse"][0] / losses["base"][0] - 1,
                               "mean_gain": mean["reuse"] / mean["base"] - 1}
        r = result["keys"][key]
        print(f"{key:12} similarity {', '.join(f'{k} {v:.3f}' for k, v in similarity.items())}  reused {r['reused_from']}  "
              f"first document {losses['base'][0]:.4f} -> {losses['reuse'][0]:.4f} ({100 * r['first_document_gain']:+.2f}%)  "
              f"first {len(rows)} {mean['base']:.4f} -> {mean['reuse']:.4f} ({100 * r['mean_gain']:+.2f}%)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
