"""Building the shipped corpus from Debian documentation packages (the repo keeps the recipe).

Each reStructuredText source of the Python 3.11 manual and of the Linux 6.1 kernel
documentation is one document: real long technical texts, thousands to tens of thousands of
tokens each. ``build_corpus`` downloads the packages with ``apt-get download`` (the package
registry is the only network this needs), extracts them, splits the documents into train and
held-out by a hash of their id, and writes JSONL files plus a manifest with licences and hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusSource:
    name: str
    package: str
    sources_dir: str  # inside the package: the Sphinx "_sources" tree of .rst.txt files
    license: str


SOURCES = (
    CorpusSource(
        "python-docs", "python3.11-doc", "usr/share/doc/python3.11/html/_sources",
        "PSF-2.0 (Python Software Foundation License; see the package's copyright file)",
    ),
    CorpusSource(
        "linux-docs", "linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/_sources",
        "GPL-2.0-only (Linux kernel documentation; some files carry other SPDX tags)",
    ),
)


# Domains the shipped model never saw, for measuring what a stream teaches it (bench/domain_stream.py).
DOMAINS = {
    "pandas": CorpusSource(
        "pandas-docs", "python-pandas-doc", "usr/share/doc/python-pandas-doc/html/_sources",
        "BSD-3-Clause (pandas documentation; see the package's copyright file)",
    ),
    "sphinx": CorpusSource(
        "sphinx-docs", "sphinx-doc", "usr/share/doc/sphinx-doc/html/_sources",
        "BSD-2-Clause (Sphinx documentation; see the package's copyright file)",
    ),
}


def is_heldout(doc_id: str, heldout_per_mille: int) -> bool:
    """Deterministic split: the same document lands on the same side on every machine."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 1000 < heldout_per_mille


def collect_documents(root: Path, source: CorpusSource, min_chars: int) -> list[dict]:
    """Documents under ``root/source.sources_dir``: one per .rst.txt file, ``min_chars`` or longer."""
    base = root / source.sources_dir
    if not base.is_dir():
        raise FileNotFoundError(f"{source.package}: no {source.sources_dir} in the package")
    docs = []
    for path in sorted(base.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) >= min_chars:
            rel = path.relative_to(base).as_posix().removesuffix(".rst.txt")
            docs.append({"id": f"{source.name}/{rel}", "source": source.name, "text": text})
    return docs


def _download(package: str, workdir: Path) -> tuple[Path, str]:
    subprocess.run(["apt-get", "download", package], cwd=workdir, check=True, capture_output=True)
    deb = next(workdir.glob(f"{package}_*.deb"))
    version = deb.name.split("_")[1]
    return deb, version


def build_corpus(dest: Path, heldout_per_mille: int = 50, min_chars: int = 2000) -> dict:
    """Download, extract and split the corpus into ``dest``; return the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = {"sources": [], "heldout_per_mille": heldout_per_mille, "min_chars": min_chars}
    counts = {"train": 0, "heldout": 0}
    with tempfile.TemporaryDirectory() as tmp, open(dest / "train.jsonl.part", "w") as train, open(
        dest / "heldout.jsonl.part", "w"
    ) as heldout:
        tmp = Path(tmp)
        for source in SOURCES:
            deb, version = _download(source.package, tmp)
            sha = hashlib.sha256(deb.read_bytes()).hexdigest()
            extract = tmp / source.name
            subprocess.run(["dpkg-deb", "-x", str(deb), str(extract)], check=True)
            docs = collect_documents(extract, source, min_chars)
            for doc in docs:
                side = "heldout" if is_heldout(doc["id"], heldout_per_mille) else "train"
                (heldout if side == "heldout" else train).write(json.dumps(doc) + "\n")
                counts[side] += 1
            manifest["sources"].append(
                {**asdict(source), "version": version, "deb_sha256": sha, "documents": len(docs),
                 "characters": sum(len(d["text"]) for d in docs)}
            )
            log.info("%s %s: %d documents", source.package, version, len(docs))
    (dest / "train.jsonl.part").rename(dest / "train.jsonl")
    (dest / "heldout.jsonl.part").rename(dest / "heldout.jsonl")
    manifest["documents"] = counts
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def build_domain(source: CorpusSource, dest: Path, heldout_per_mille: int = 300, min_chars: int = 4000) -> dict:
    """One domain's documents split into ``stream.jsonl`` and ``heldout.jsonl`` under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb, version = _download(source.package, tmp)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        docs = collect_documents(tmp / "x", source, min_chars)
        sha = hashlib.sha256(deb.read_bytes()).hexdigest()
    sides = {"stream": [], "heldout": []}
    for doc in docs:
        sides["heldout" if is_heldout(doc["id"], heldout_per_mille) else "stream"].append(doc)
    for side, rows in sides.items():
        (dest / f"{side}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in rows))
    manifest = {**asdict(source), "version": version, "deb_sha256": sha, "min_chars": min_chars,
                "heldout_per_mille": heldout_per_mille, "documents": {k: len(v) for k, v in sides.items()}}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def write_rehearsal_sample(train: Path, dest: Path, tokenizer, documents: int = 24, max_tokens: int = 2048) -> int:
    """A model's rehearsal set (``model.slow.rehearsal_path``): ``documents`` documents of its
    training split, chosen by a hash of their id (so every source appears in proportion), each
    cut to ``max_tokens`` tokens. Returns the number of tokens written."""
    rows = [json.loads(line) for line in Path(train).read_text().splitlines() if line.strip()]
    rows.sort(key=lambda d: hashlib.sha256(d["id"].encode()).hexdigest())
    written, out = 0, []
    for doc in rows[:documents]:
        ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"][:max_tokens]
        out.append(json.dumps({"id": doc["id"], "source": doc.get("source"), "text": tokenizer.decode(ids)}) + "\n")
        written += len(ids)
    dest.write_text("".join(out))
    return written
