"""Held-out evaluation by position, and the shipped model adapting on a real long document."""

import inspect
import json

import torch

from tests.ttt_model.reference import randomise_ttt_parameters, tiny_model
from ttt_model import TTTConfig, enable_ttt, load_ttt_model
from ttt_model.training.evaluate import evaluate, format_table, plot, static_mode
from ttt_model.training.train import load_tokenizer
from tests.conftest import ROOT

SHIPPED = ROOT / "models" / "ttt-tiny-qwen3"


def test_evaluate_buckets_by_position_for_every_mode(tmp_path):
    model = tiny_model("llama", seed=3)
    enable_ttt(model, TTTConfig(layers=[1], chunk_size=16))
    randomise_ttt_parameters(model, seed=4)
    docs = [torch.randint(0, 101, (n,)).tolist() for n in (700, 300)]
    gradient = TTTConfig(layers=[1], chunk_size=64, objective="gradient", gradient_lr=0.1)
    result = evaluate(model, docs, ["static", "in_place", "gradient"], gradient, max_tokens=600, device="cpu")
    assert result["buckets"]["0-512"]["tokens"] == 511 + 299
    assert result["buckets"]["512-2048"]["tokens"] == 88  # positions 512..599 of the long document
    assert "2048-8192" not in result["buckets"]
    rows = result["buckets"].values()
    assert all(torch.isfinite(torch.tensor(r[m])) for r in rows for m in ("static", "in_place", "gradient"))
    assert result["buckets"]["0-512"]["in_place"] != result["buckets"]["0-512"]["static"]
    plot(result, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert "in_place vs static" in format_table(result)


def test_static_mode_restores_the_ttt_layers():
    model = tiny_model("qwen3", seed=5)
    enable_ttt(model, TTTConfig(layers=[0], chunk_size=4))
    mlp = model.model.layers[0].mlp
    with static_mode(model):
        assert model.model.layers[0].mlp is mlp.base_mlp
    assert model.model.layers[0].mlp is mlp


def test_shipped_model_adapts_in_place_on_a_real_long_document():
    """The embedded default, read over argparse.py's source: TTT lowers loss past position 2k."""
    import argparse

    model = load_ttt_model(SHIPPED, dtype=torch.float32).eval()
    assert model.config.ttt["layers"] == [1, 3, 5] and model.config.ttt["target"] == "input_embeddings"
    tokenizer = load_tokenizer(SHIPPED)
    ids = torch.tensor(tokenizer(inspect.getsource(argparse))["input_ids"][:4096])[None]
    with torch.no_grad():
        adapted = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
        with static_mode(model):
            static = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    chunk = model.config.ttt["chunk_size"]
    assert torch.allclose(adapted[: chunk - 1], static[: chunk - 1])  # the first chunk has no update yet
    assert adapted[2048:].mean() < 0.97 * static[2048:].mean()
    assert static[:512].mean() < 6.0  # a trained model, not a random one (ln 8192 = 9.0)
