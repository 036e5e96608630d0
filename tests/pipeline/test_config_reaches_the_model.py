"""A setting of the slow block is defined once, in ttt_model.config, and reaches every model the
stream builds from it (the reader actors, the pyfunc flavour and ``export``) with no second copy
to update: a changed default is seen in all of them."""


import pytest

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from pipeline.processing.actor_specs import as_actors_see_it, effective_model_config, reader_spec
from pipeline.state.adapted_model import load_adapted_model
from pipeline.config import AppConfig, ModelConfig, parse_config
from tests.sample_text import SAMPLE_TEXT
from ttt_model.config import SlowConfig
from tests.conftest import TINY_MODEL

MODEL = str(TINY_MODEL)


@pytest.fixture
def slow_rank_default_3():
    field = SlowConfig.model_fields["rank"]
    original = field.default
    field.default = 3
    try:
        for model in (SlowConfig, ModelConfig, AppConfig):
            model.model_rebuild(force=True)
        yield
    finally:
        field.default = original
        for model in (SlowConfig, ModelConfig, AppConfig):
            model.model_rebuild(force=True)


def ranks(learner) -> set[int]:
    return {adapter.A.shape[0] for adapter in learner.new_state().adapters.values()}


def test_a_changed_slow_default_reaches_the_reader_the_pyfunc_and_export(slow_rank_default_3, tmp_path):
    config = parse_config({"model": {"path": MODEL, "device": "cpu", "slow": {"enabled": True}},
                           "processor": {"spill_dir": str(tmp_path)}}, environ={})
    assert config.model.slow.rank == 3
    reader = DocumentReader(reader_spec(as_actors_see_it(config)), name="w0")
    assert ranks(reader.slow) == {3}
    reader.process(DocumentTask("d0", SAMPLE_TEXT[:1500]))
    (blob,) = reader.snapshot()
    # What a checkpoint records, and what the pyfunc flavour and export load it with.
    model_config = effective_model_config(config)
    assert model_config["slow"]["rank"] == 3
    adapted = load_adapted_model(MODEL, model_config, blob.data)
    assert ranks(adapted.learner) == {3}
    assert adapted.state.slow.steps == reader.mode.states.get(None).state.slow.steps == 1
