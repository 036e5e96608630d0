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


PLAIN = [  # (family, target, total, lengths: None for a near-equal split over two ranks)
    (family, target, total, lengths)
    for family, target in [("qwen3", "hidden_states"), ("llama", "input_embeddings")]
    for total, lengths in [
        (48, (24, 24)),            # multiple of the chunk, segments on chunk borders
        (45, None),                # not a multiple; near-equal split cuts chunks
        (50, (13, 20, 17)),        # three ranks, every border inside a chunk
        (40, (3, 30, 7)),          # a segment shorter than the conv halo's reach... and one spanning chunks
    ]
]
GUARDED = [  # (safeguards, total, lengths)
    ({"decay": 0.3}, 45, (23, 22)),
    ({"decay": 0.3}, 50, (13, 20, 17)),
    ({"max_update_norm": 0.05}, 45, (23, 22)),
    ({"max_update_norm": 0.05}, 50, (13, 20, 17)),
    ({"max_delta_ratio": 0.01}, 48, (24, 24)),
    ({"max_delta_ratio": 0.01}, 50, (13, 20, 17)),
    ({"decay": 0.3, "max_update_norm": 0.05, "max_delta_ratio": 0.01}, 40, (3, 30, 7)),
]


def case(family: str, target: str, total: int, lengths: tuple[int, ...] | None, safeguards: dict | None = None) -> dict:
    lengths = tuple(lengths or split_lengths(total, 2))
    return {"key": repr((family, target, total, lengths, safeguards)), "family": family, "target": target,
            "lengths": lengths, "safeguards": safeguards,
            "ids": torch.randint(0, 101, (2, total), generator=torch.Generator().manual_seed(total))}


CASES = [case(*c) for c in PLAIN] + [case("qwen3", "hidden_states", total, lengths, g) for g, total, lengths in GUARDED]


def run_rank(rank: int, world: int, port: int, cases: list[dict], out) -> None:
    """Every case of this world size, one after another in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for c in cases:
            model = build(c["family"], c["target"], c["safeguards"])
            cp = ContextParallelGroup(rank, c["lengths"])
            state = FastWeightState.for_model(model, batch_size=c["ids"].shape[0])
            logits = context_parallel_forward(model, c["ids"][:, cp.start : cp.end], cp, state)
            out[c["key"], rank] = {"logits": logits, "state": state.state_dict()}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def parallel_outputs() -> dict:
    """What each rank computed for every case: one spawn of two ranks and one of three, each
    reading all its cases (a spawn per case paid the ranks' start, seconds, each time)."""
    out = mp.Manager().dict()
    for world in sorted({len(c["lengths"]) for c in CASES}):
        cases = [c for c in CASES if len(c["lengths"]) == world]
        mp.spawn(run_rank, args=(world, free_port(), cases, out), nprocs=world, join=True)
    return dict(out)


def assert_equal_to_one_process(outputs: dict, c: dict, want: torch.Tensor, state: FastWeightState) -> None:
    world = len(c["lengths"])
    got = torch.cat([outputs[c["key"], r]["logits"] for r in range(world)], dim=1)
    assert rel_err(got, want) < 1e-5
    for r in range(world):
        for name, tensor in state.state_dict().items():
            theirs = outputs[c["key"], r]["state"][name]
            assert rel_err(theirs, tensor) < 1e-5 or torch.equal(theirs, tensor), name


@pytest.mark.parametrize("family, target, total, lengths", PLAIN)
def test_context_parallel_equals_single_process(family, target, total, lengths, parallel_outputs):
    c = case(family, target, total, lengths)
    model = build(family, target)
    state = FastWeightState.for_model(model, batch_size=2)
    want = TTTSession(model, state).feed(c["ids"]).logits
    assert_equal_to_one_process(parallel_outputs, c, want, state)


def single_process(family: str, target: str, ids: torch.Tensor, safeguards: dict | None):
    model = build(family, target, safeguards)
    state = FastWeightState.for_model(model, batch_size=ids.shape[0])
    return TTTSession(model, state).feed(ids).logits, state


@pytest.mark.parametrize("safeguards, total, lengths", GUARDED)
def test_context_parallel_with_safeguards_equals_single_process(safeguards, total, lengths, parallel_outputs):
    c = case("qwen3", "hidden_states", total, lengths, safeguards)
    want, state = single_process("qwen3", "hidden_states", c["ids"], safeguards)
    # The safeguard binds on this input: without it the logits are different.
    unguarded, _ = single_process("qwen3", "hidden_states", c["ids"], None)
    assert rel_err(unguarded, want) > 1e-3
    assert_equal_to_one_process(parallel_outputs, c, want, state)
