"""Context parallelism over real Ray actors (gloo): 2 and 3 members give the single-process
logits, per-token loss and final state."""

import pytest
import torch

from actors.cp_group import ContextParallelActors
from tests.ttt_model.reference import randomise_ttt_parameters, rel_err, tiny_model
from ttt_model import FastWeightState, TTTConfig, TTTSession, enable_ttt

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
