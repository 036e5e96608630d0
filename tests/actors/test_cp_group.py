"""Context parallelism over real Ray actors (gloo): 2 and 3 members give the single-process
logits, per-token loss and final state."""

import pytest
import torch

from actors.cp_group import ContextParallelActors
from tests.ttt_model.reference import randomise_ttt_parameters, rel_err, tiny_model
from ttt_model import FastWeightState, TTTConfig, TTTSession, enable_ttt
from ttt_model.config import SlowConfig
from pipeline.processing.actor_specs import standalone_reader_spec

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny_model("qwen3", seed=11)
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=8, eta=0.7))
    randomise_ttt_parameters(model, seed=12)
    path = tmp_path_factory.mktemp("cp-model")
    model.save_pretrained(path)
    return path, model.eval()


@pytest.mark.parametrize("world, total", [(2, 48), (2, 45), (3, 50)])
def test_actor_group_equals_single_process(ray_session, model_dir, world, total):
    path, model = model_dir
    ids = torch.randint(0, 101, (1, total), generator=torch.Generator().manual_seed(total))
    group = ContextParallelActors(str(path), world=world, num_cpus=0.5)
    try:
        reading = group.read(ids, with_logits=True)
    finally:
        group.shutdown()
    state = FastWeightState.for_model(model)
    out = TTTSession(model, state).feed(ids)
    assert rel_err(torch.cat(reading.logits, dim=1), out.logits) < 1e-5
    assert rel_err(reading.nll, out.nll[:, 1:]) < 1e-5
    for name, tensor in state.state_dict().items():
        assert torch.equal(reading.state[name], tensor) or rel_err(reading.state[name], tensor) < 1e-5, name
    assert all(c > 0 for c in reading.communication_seconds)


def test_reader_routes_long_windows_to_the_service_and_keeps_the_state(ray_session, tmp_path):
    """A reader with a global state reads short documents itself and long ones through the
    service, which starts from the reader's state and hands back the state after the document:
    losses and the final state equal a reader that read everything itself (shipped model)."""
    import ray
    from safetensors.torch import load

    from actors.cp_group import ContextParallelService, ContextParallelSpec
    from actors.call_types import DocumentTask
    from actors.document_reader import DocumentReader
    from tests.actors.test_document_reader import MODEL, TEXT

    service = ContextParallelService.remote(ContextParallelSpec(MODEL, world=2, num_cpus=0.5, num_gpus=0.0, ttt=TTTConfig(), num_threads=None, strategy="PACK", slow=SlowConfig()))
    base = dict(model_path=MODEL, device="cpu", scope="global", spill_dir=str(tmp_path))
    routed = DocumentReader(standalone_reader_spec(**base, context_parallel_min_tokens=700), "routed",
                            lambda ids, state, version: ray.get(service.read.remote(ids, state, version)))
    alone = DocumentReader(standalone_reader_spec(**base), "alone")
    texts = [TEXT[:1500], TEXT[:4000], TEXT[4000:5000], TEXT[1000:5500]]  # short, long, short, long
    try:
        for i, text in enumerate(texts):
            a, b = routed.process(DocumentTask(f"d{i}", text)), alone.process(DocumentTask(f"d{i}", text))
            assert a.tokens == b.tokens and a.loss == pytest.approx(b.loss, rel=1e-5), i
        assert routed.mode.window_reader.parallel_windows == 2
        [got], [want] = routed.snapshot(), alone.snapshot()
        got, want = load(got.data), load(want.data)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor) or rel_err(got[name], tensor) < 1e-5, name
    finally:
        ray.get(service.shutdown.remote())
        ray.kill(service)


def test_service_fails_cleanly_when_a_member_dies_and_forms_a_new_group(ray_session, model_dir):
    import os
    import signal

    import ray

    from actors.cp_group import ContextParallelFailure, ContextParallelService, ContextParallelSpec

    path, model = model_dir
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(1))
    service = ContextParallelService.remote(ContextParallelSpec(str(path), world=2, num_cpus=0.5, num_gpus=0.0, ttt=TTTConfig(), num_threads=None, strategy="PACK", slow=SlowConfig()))
    try:
        pids = ray.get(service.member_pids.remote())
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayTaskError) as failed:
            ray.get(service.read.remote(ids, None))
        assert isinstance(failed.value.cause, ContextParallelFailure)
        nll, state = ray.get(service.read.remote(ids, None))  # a new group serves the retry
        assert set(ray.get(service.member_pids.remote())).isdisjoint(pids)
        out = TTTSession(model, FastWeightState.for_model(model)).feed(ids)
        assert rel_err(nll, out.nll[:, 1:]) < 1e-5
        stats = ray.get(service.stats.remote())
        assert stats["failures"] == 1 and stats["reads"] == 1
    finally:
        ray.get(service.shutdown.remote())
        ray.kill(service)
