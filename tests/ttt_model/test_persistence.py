"""Save/load of TTT models (HF checkpoints) and of fast-weight states (safetensors + sha256)."""

import copy
import json

import pytest
import torch

from tests.ttt_model.reference import randomise_ttt_parameters, tiny_model
from ttt_model import FastWeightState, StateIntegrityError, TTTConfig, TTTSession, enable_ttt, load_ttt_model
from ttt_model.model.state import sidecar_path


def adapted_session(seed=0):
    model = tiny_model("qwen3", seed=seed)
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=4, eta=0.8, target="input_embeddings"))
    randomise_ttt_parameters(model, seed=seed + 1)
    session = TTTSession(model)
    session.feed(torch.randint(0, 101, (1, 14)))
    return model, session


def test_save_pretrained_round_trips_a_ttt_model(tmp_path):
    model, _ = adapted_session()
    ids = torch.randint(0, 101, (2, 21))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["ttt"]["layers"] == [0, 2] and config["ttt"]["target"] == "input_embeddings"
    loaded = load_ttt_model(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.ttt["chunk_size"] == 4
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_load_of_a_plain_checkpoint_gives_a_plain_model(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = load_ttt_model(tmp_path)
    assert not any(".ttt_" in n for n, _ in loaded.named_parameters())


def test_state_save_load_round_trip_with_hash(tmp_path):
    model, session = adapted_session()
    digest = session.state.save(tmp_path / "state.safetensors", metadata={"stream": "s"})
    sidecar = json.loads(sidecar_path(tmp_path / "state.safetensors").read_text())
    assert sidecar["sha256"] == digest and len(digest) == 64
    fresh = FastWeightState.for_model(model)
    fresh.load(tmp_path / "state.safetensors", expected_sha256=digest)
    for idx, layer in session.state:
        assert torch.equal(fresh.layers[idx].delta, layer.delta)
        assert torch.equal(fresh.layers[idx].tail_h, layer.tail_h)
        assert fresh.layers[idx].tokens_seen == layer.tokens_seen == 14
    probe = torch.randint(0, 101, (1, 9))
    a = TTTSession(model, state=session.state.clone())
    a.cache, a.last_logits = copy.deepcopy(session.cache), session.last_logits
    b = TTTSession(model, state=fresh)
    b.cache, b.last_logits = copy.deepcopy(session.cache), session.last_logits
    # Same state, same cache: identical continuation.
    assert torch.equal(a.feed(probe).logits, b.feed(probe).logits)


def test_corrupt_state_is_refused_and_current_state_kept(tmp_path):
    model, session = adapted_session()
    path = tmp_path / "state.safetensors"
    session.state.save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    target = FastWeightState.for_model(model)
    with pytest.raises(StateIntegrityError, match="sha256"):
        target.load(path)
    assert all(n.item() == 0 for n in target.norms().values())


def test_missing_sidecar_and_wrong_expected_hash_are_refused(tmp_path):
    model, session = adapted_session()
    path = tmp_path / "state.safetensors"
    session.state.save(path)
    target = FastWeightState.for_model(model)
    with pytest.raises(StateIntegrityError, match="does not match"):
        target.load(path, expected_sha256="0" * 64)
    sidecar_path(path).unlink()
    with pytest.raises(StateIntegrityError, match="sidecar"):
        target.load(path)


def test_state_of_another_model_shape_is_refused(tmp_path):
    _, session = adapted_session()
    session.state.save(tmp_path / "s.safetensors")
    other = tiny_model("qwen3", seed=1)
    enable_ttt(other, TTTConfig(layers=[1], chunk_size=4))
    with pytest.raises(StateIntegrityError, match="does not fit"):
        FastWeightState.for_model(other).load(tmp_path / "s.safetensors")
