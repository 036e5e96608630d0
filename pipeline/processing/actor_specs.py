"""What the actors are given, built from the stream's config in one place: every path as the
actors see it, the reader actors' ``ReaderSpec``, the context-parallel group's spec, and the
model configuration that checkpoints record. No Ray here: the benches build the same specs on
machines without it."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.state.base_model import BaseModelSource, is_model_uri
from actors.call_types import ContextParallelSpec, ReaderSpec
from pipeline.config import AppConfig, ModelConfig, ProcessorConfig


def as_actors_see_it(config: AppConfig, job_working_dir: bool = False) -> AppConfig:
    """``config`` with every path the actors open (model, model cache, rehearsal file, spill
    directory) absolute, as actors that need not share the driver's working directory must see
    it; with ``job_working_dir`` (a Ray job that ships its working directory, which every actor
    runs in, on its own node) relative paths stay relative."""
    def seen(path: str | Path) -> str:
        return str(path) if job_working_dir else str(Path(path).resolve())

    m, p = config.model, config.processor
    slow = m.slow
    if slow.rehearsal_path is not None:
        slow = slow.model_copy(update={"rehearsal_path": seen(slow.rehearsal_path)})
    model = m.model_copy(update={
        "path": m.path if is_model_uri(m.path) else seen(m.path),
        "cache_dir": Path(seen(m.cache_dir)), "slow": slow,
    })
    processor = p.model_copy(update={"spill_dir": Path(seen(p.spill_dir))})
    return config.model_copy(update={"model": model, "processor": processor})


def reader_spec(config: AppConfig, source: BaseModelSource | None = None) -> ReaderSpec:
    """The reader actors' view of the config (paths as given: see ``as_actors_see_it``;
    ``source``: the registered model ``model.path`` names, pinned to one version by the driver)."""
    m, p = config.model, config.processor
    return ReaderSpec(
        model_path=source.uri if source else m.path,
        model_source=source,
        model_cache_dir=str(m.cache_dir),
        device=m.device,
        dtype=m.dtype,
        ttt=m.ttt,
        slow=m.slow,
        scope=p.scope,
        max_keys_in_memory=p.max_keys_in_memory,
        max_keys=p.max_keys,
        key_retention_documents=p.key_retention_documents,
        spill_dir=str(p.spill_dir),
        max_document_tokens=p.max_document_tokens,
        oversize=p.oversize,
        base_loss_sample_rate=p.base_loss_sample_rate,
        deterministic=p.deterministic,
        context_parallel_min_tokens=p.context_parallel.min_tokens if p.context_parallel else None,
        batch_tokens=p.batch_tokens,
        slow_from_learner=p.learner.enabled,
        split_at_adapters=hands_off(p),
        tokenize_ahead=None,
    )


def context_parallel_spec(config: AppConfig) -> ContextParallelSpec | None:
    """The context-parallel group's spec (None: no group)."""
    cp = config.processor.context_parallel
    if cp is None:
        return None
    return ContextParallelSpec(
        model_path=config.model.path, world=cp.world, num_cpus=cp.num_cpus, num_gpus=cp.num_gpus,
        ttt=config.model.ttt, num_threads=1 if config.processor.deterministic else None,
        strategy=cp.placement_strategy,
        # With the learner, the group reads with its versions, through the same adapters.
        slow=config.model.slow,
    )


def hands_off(p: ProcessorConfig) -> bool:
    """Whether the readers hand the learner the hidden states below the adapters: readers beside
    a learner that runs a document behind them (lag 2 or more; at lag 1 it would wait for them)."""
    return p.learner.enabled and not p.learner.synchronous and p.learner.lag >= 2


def effective_model_config(config: AppConfig, model_dir: Path | None = None) -> dict[str, Any]:
    """What the readers read with, recorded in every checkpoint: the model's TTT config with the
    stream's overrides, the slow-weight config, the sha256 of its rehearsal file and the state
    scope (which says what a version loaded without a choice of state is)."""
    slow = config.model.slow
    recorded = {"ttt": config.model.effective_ttt(model_dir).model_dump(), "slow": slow.model_dump(),
                "scope": config.processor.scope}
    if slow.enabled and slow.rehearsal_path is not None and Path(slow.rehearsal_path).is_file():
        recorded["rehearsal_sha256"] = hashlib.sha256(Path(slow.rehearsal_path).read_bytes()).hexdigest()
    return recorded


def standalone_reader_spec(model_path: str | Path, **changes: Any) -> ReaderSpec:
    """A ReaderSpec for a reader outside a stream (tests, benches): the config model's defaults,
    then ``changes`` (ReaderSpec fields; ``ttt`` and ``slow`` as dicts of fields or configs)."""
    model = ModelConfig(path=str(model_path), ttt=changes.pop("ttt", {}), slow=changes.pop("slow", {}))
    return replace(reader_spec(as_actors_see_it(AppConfig(model=model))), **changes)
