"""A checkpoint as the paper's reference implementation saves it (its config keys, its parameter
names, P applied as the raw matrix: V = t~ @ ttt_proj.weight) converts to ours and gives the
logits of the reference equations, computed here in float64 token by token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.ttt_model.reference import reference_ttt_mlp, rel_err, tiny_model
from ttt_model import load_ttt_model
from ttt_model.training.reference_checkpoint import convert_reference_checkpoint

LAYERS, CHUNK, ETA = [0, 2], 8, 0.3


def write_reference_checkpoint(path: Path, target: str = "hidden_states", seed: int = 0) -> dict[int, dict]:
    """A tiny Qwen3 saved the reference's way; returns each TTT layer's raw conv and P."""
    model = tiny_model("qwen3", seed=seed)
    model.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed + 10)
    d = model.config.hidden_size
    raw = {i: {"conv": torch.randn(d, 1, 5, generator=gen) * 0.3, "P": torch.randn(d, d, generator=gen) * 0.3}
           for i in LAYERS}
    tensors = load_file(str(path / "model.safetensors"))
    for i, p in raw.items():
        tensors[f"model.layers.{i}.mlp.ttt_conv.weight"] = p["conv"]
        tensors[f"model.layers.{i}.mlp.ttt_proj.weight"] = p["P"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.update(ttt_mode=True, ttt_layers=LAYERS, ttt_chunk=CHUNK, ttt_lr=ETA, ttt_proj=True, ttt_target=target)
    (path / "config.json").write_text(json.dumps(config))
    return raw


def reference_equations_logits(path: Path, raw: dict[int, dict], ids: torch.Tensor, target: str) -> torch.Tensor:
    """The plain model in float64 whose TTT layers' MLPs follow the reference's equations:
    V = conv(t) @ P with P the raw stored matrix, dW_i = eta V_i^T h_i, chunk i served by W_0 + sum_{j<i} dW_j."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).double().eval()
    embeddings = model.get_input_embeddings()(ids)[0]
    for i, p in raw.items():
        mlp = model.model.layers[i].mlp

        def forward(x, mlp=mlp, p=p):
            t = x[0] if target == "hidden_states" else embeddings
            # reference_ttt_mlp applies proj as a Linear weight (value = proj @ t~): give it P^T,
            # so that value = P^T t~, the column form of the reference's row t~ @ P.
            out, _ = reference_ttt_mlp(x[0], t, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                       p["conv"][:, 0, :], p["P"].t(), ETA, CHUNK, mlp.act_fn)
            return out[None]

        mlp.forward = forward
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
def test_a_reference_checkpoint_converts_to_the_logits_of_the_reference_equations(tmp_path, target):
    raw = write_reference_checkpoint(tmp_path / "reference", target)
    out = convert_reference_checkpoint(tmp_path / "reference", tmp_path / "ours")
    model = load_ttt_model(out, torch_dtype=torch.float64).eval()
    config = model.config.ttt
    assert (config["layers"], config["chunk_size"], config["eta"], config["use_proj"]) == (LAYERS, CHUNK, ETA, True)
    assert config["target"] == {"hidden_states": "hidden_states", "input_embed": "input_embeddings"}[target]
    assert not any(k.startswith("ttt_") for k in json.loads((out / "config.json").read_text()))

    ids = torch.randint(0, model.config.vocab_size, (1, 3 * CHUNK + 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids).logits
    want = reference_equations_logits(tmp_path / "reference", raw, ids, target)
    assert rel_err(got, want) < 1e-10
    # P, not P^T: loading the raw tensor as our Linear weight would give other logits
    (tmp_path / "unconverted").mkdir()
    for f in (tmp_path / "ours").iterdir():
        (tmp_path / "unconverted" / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "reference" / "model.safetensors"))
    save_file(tensors, str(tmp_path / "unconverted" / "model.safetensors"), metadata={"format": "pt"})
    from ttt_model.model.patch import static_mode

    with torch.no_grad(), static_mode(model):
        plain = model(ids).logits  # TTT off: what the fast weights change is want - plain
        wrong = load_ttt_model(tmp_path / "unconverted", torch_dtype=torch.float64).eval()(ids).logits
    assert (wrong - want).norm() > 0.1 * (want - plain).norm() > 0


def test_a_reference_checkpoint_without_the_layers_it_names_is_refused(tmp_path):
    write_reference_checkpoint(tmp_path / "reference")
    config = json.loads((tmp_path / "reference" / "config.json").read_text())
    config["ttt_layers"] = [0, 1, 2]
    (tmp_path / "reference" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ttt_layers \[0, 1, 2\] but ttt_conv weights for layers \[0, 2\]"):
        convert_reference_checkpoint(tmp_path / "reference", tmp_path / "ours")


def test_the_command_converts_and_names_a_pickled_checkpoint_it_will_not_read(tmp_path):
    import subprocess
    import sys

    write_reference_checkpoint(tmp_path / "reference")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "convert-reference", str(tmp_path / "reference"),
                           str(tmp_path / "ours")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_ttt_model(tmp_path / "ours").config.ttt["layers"] == LAYERS
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    refused = subprocess.run([sys.executable, "-m", "pipeline.cli", "convert-reference", str(tmp_path / "pickled"),
                              str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pytorch_model.bin" in refused.stderr and "pickled" in refused.stderr
