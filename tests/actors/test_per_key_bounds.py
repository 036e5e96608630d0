"""Thousands of tenants through a per_key reader (the shipped model, real reads): the keys it
holds, its spill directory and its memory stay within the bounds the config sets and the docs
documents (max_keys x one state's size on disk; max_keys_in_memory states in memory). 10,000
keys through the store alone: tests/actors/test_state_store.py."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from pipeline.processing.actor_specs import standalone_reader_spec
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow]


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1e6


KEYS = 800


def test_many_keys_stay_within_the_key_disk_and_memory_bounds(tmp_path):
    reader = DocumentReader(standalone_reader_spec(model_path=str(ROOT / "models/ttt-tiny-qwen3"), device="cpu", scope="per_key",
                                       max_keys_in_memory=64, max_keys=256, spill_dir=str(tmp_path)), name="w")
    state_bytes = len(reader.mode.new_state().to_bytes())
    spill = tmp_path / "w"
    for i in range(100):  # the memory of 64 states and the allocator's pools, before measuring
        reader.process(DocumentTask(f"warm-{i}", "a short document about pandas", key=f"warm-{i}"))
    before = rss_mb()
    peak_files = 0
    for i in range(KEYS):
        outcome = reader.process(DocumentTask(f"d{i}", f"tenant {i} writes a short document", key=f"tenant-{i}"))
        assert outcome.ok and outcome.state_documents == 1
        if i % 100 == 0:
            peak_files = max(peak_files, len(list(spill.glob("*.safetensors"))))
    files = list(spill.glob("*.safetensors"))
    assert len(reader.mode.states) == 256 and reader.mode.states.in_memory == 64
    assert len(files) == 256 - 64 and peak_files <= 256 - 64
    assert len(list(spill.iterdir())) == 2 * len(files)  # each state and its sha256 sidecar, nothing else
    assert sum(f.stat().st_size for f in files) <= (256 - 64) * (state_bytes + 4096)
    assert reader.mode.states.expired == KEYS + 100 - 256
    # Memory: no growth with the number of tenants seen (64 states were held before as after);
    # without return_freed_states_to_the_os it grew by 53 MB over the first 500 keys, and on.
    assert rss_mb() - before < 30, (before, rss_mb())


def test_the_configs_state_size_bound_holds_for_the_states_a_reader_makes(tmp_path):
    """What the config refuses at load (max_keys_in_memory states against reader_memory_mb) is
    sized from config.json: a lower bound of the real state, and within its safetensors header."""
    from pipeline.config import parse_config

    model = str(ROOT / "models/ttt-tiny-qwen3")
    bound = parse_config({"model": {"path": model}}, environ={}).model.per_key_state_bytes()
    reader = DocumentReader(standalone_reader_spec(model_path=model, device="cpu", scope="per_key",
                                                   spill_dir=str(tmp_path)), name="w")
    state_bytes = len(reader.mode.new_state().to_bytes())
    assert bound <= state_bytes < bound + 16_384, (bound, state_bytes)
