"""Context parallelism over gloo: logits and the final streaming state equal the single-process
result, for lengths that are and are not multiples of the chunk, and segments that split chunks,
with and without the safeguards (clip, decay, cap)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.ttt_model.reference import randomise_ttt_parameters, rel_err, tiny_model
from ttt_model import FastWeightState, TTTConfig, TTTSession, enable_ttt
from ttt_model.parallel import ContextParallelGroup, context_parallel_forward, split_lengths

CHUNK = 8


def build(family: str, target: str, safeguards: dict | None = None):
    model = tiny_model(family, seed=3)
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=CHUNK, eta=0.7, target=target, **(safeguards or {})))
    randomise_ttt_parameters(model, seed=4)
    return model.eval()


def run_rank(rank: int, world: int, port: int, lengths, family: str, target: str, ids, out,
             safeguards: dict | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build(family, target, safeguards)
        cp = ContextParallelGroup(rank, tuple(lengths))
        state = FastWeightState.for_model(model, batch_size=ids.shape[0])
        logits = context_parallel_forward(model, ids[:, cp.start : cp.end], cp, state)
        out[rank] = {"logits": logits, "state": state.state_dict()}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family, target", [("qwen3", "hidden_states"), ("llama", "input_embeddings")])
@pytest.mark.parametrize("total, lengths", [
    (48, (24, 24)),            # multiple of the chunk, segments on chunk borders
    (45, None),                # not a multiple; near-equal split cuts chunks
    (50, (13, 20, 17)),        # three ranks, every border inside a chunk
    (40, (3, 30, 7)),          # a segment shorter than the conv halo's reach... and one spanning chunks
])
def test_context_parallel_equals_single_process(family, target, total, lengths):
    world = 2 if lengths is None else len(lengths)
    lengths = lengths or split_lengths(total, world)
    ids = torch.randint(0, 101, (2, total), generator=torch.Generator().manual_seed(total))
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(run_rank, args=(world, free_port(), lengths, family, target, ids, out), nprocs=world, join=True)

    model = build(family, target)
    state = FastWeightState.for_model(model, batch_size=2)
    want = TTTSession(model, state).feed(ids).logits
    got = torch.cat([out[r]["logits"] for r in range(world)], dim=1)
    assert rel_err(got, want) < 1e-5
    for r in range(world):
        for name, tensor in state.state_dict().items():
            assert rel_err(out[r]["state"][name], tensor) < 1e-5 or torch.equal(out[r]["state"][name], tensor), name


def single_process(family: str, target: str, ids: torch.Tensor, safeguards: dict | None):
    model = build(family, target, safeguards)
    state = FastWeightState.for_model(model, batch_size=ids.shape[0])
    return TTTSession(model, state).feed(ids).logits, state


@pytest.mark.parametrize("safeguards, total, lengths", [
    ({"decay": 0.3}, 45, (23, 22)),
    ({"decay": 0.3}, 50, (13, 20, 17)),
    ({"max_update_norm": 0.05}, 45, (23, 22)),
    ({"max_update_norm": 0.05}, 50, (13, 20, 17)),
    ({"max_delta_ratio": 0.01}, 48, (24, 24)),
    ({"max_delta_ratio": 0.01}, 50, (13, 20, 17)),
    ({"decay": 0.3, "max_update_norm": 0.05, "max_delta_ratio": 0.01}, 40, (3, 30, 7)),
])
def test_context_parallel_with_safeguards_equals_single_process(safeguards, total, lengths):
    world = len(lengths)
    ids = torch.randint(0, 101, (2, total), generator=torch.Generator().manual_seed(total))
    want, state = single_process("qwen3", "hidden_states", ids, safeguards)
    # The safeguard binds on this input: without it the logits are different.
    unguarded, _ = single_process("qwen3", "hidden_states", ids, None)
    assert rel_err(unguarded, want) > 1e-3

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(run_rank, args=(world, free_port(), lengths, "qwen3", "hidden_states", ids, out, safeguards),
             nprocs=world, join=True)
    got = torch.cat([out[r]["logits"] for r in range(world)], dim=1)
    assert rel_err(got, want) < 1e-5
    for r in range(world):
        for name, tensor in state.state_dict().items():
            assert rel_err(out[r]["state"][name], tensor) < 1e-5 or torch.equal(out[r]["state"][name], tensor), name
