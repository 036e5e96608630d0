from pathlib import Path

from pipeline.local.corpus import SOURCES, collect_documents, is_heldout


def test_collect_documents_keeps_long_rst_sources_with_ids(tmp_path):
    source = SOURCES[0]
    base = tmp_path / source.sources_dir
    (base / "library").mkdir(parents=True)
    (base / "library" / "os.rst.txt").write_text("os module\n" + "x" * 3000)
    (base / "short.rst.txt").write_text("too short")
    (base / "notes.html").write_text("y" * 5000)
    docs = collect_documents(tmp_path, source, min_chars=2000)
    assert [d["id"] for d in docs] == ["python-docs/library/os"]
    assert docs[0]["text"].startswith("os module")


def test_heldout_split_is_deterministic_and_near_the_fraction():
    ids = [f"doc-{i}" for i in range(4000)]
    first = [is_heldout(i, 50) for i in ids]
    assert first == [is_heldout(i, 50) for i in ids]
    assert 120 < sum(first) < 280  # 5% of 4000 = 200
