"""The In-Place TTT model against the float64 token-by-token reference, for every family."""

import weakref

import pytest
import torch

from tests.ttt_model.reference import (
    FAMILY_CONFIGS,
    randomise_ttt_parameters,
    reference_logits,
    reference_ttt_mlp,
    rel_err,
    tiny_model,
)
from ttt_model import TTTConfig, enable_ttt
from ttt_model.model.state import ttt_layers

FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_ttt_model_equals_base_model_exactly(family):
    model = tiny_model(family)
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        base = model(ids).logits
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    # With autograd on (training), the TTT path runs so the zero conv gets its gradient; the
    # chunked products then round differently, but only at float precision.
    assert rel_err(model(ids).logits.detach(), base) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [32, 29, 5])  # multiple of C, not a multiple, shorter than C
def test_parallel_forward_matches_reference_fp32(family, length):
    model = tiny_model(family, seed=hash((family, length)) % 1000)
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=8, eta=0.7))
    randomise_ttt_parameters(model, seed=length)
    ids = torch.randint(0, 101, (2, length))
    with torch.no_grad():
        got = model(ids).logits
    want = reference_logits(model, ids)
    assert rel_err(got, want) < 1e-5
    if length >= 16:  # the TTT path really changed the output
        enable_free = tiny_model(family, seed=hash((family, length)) % 1000)
        assert rel_err(enable_free(ids).logits, want) > 1e-4


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_parallel_forward_matches_reference_bf16(family):
    model = tiny_model(family, seed=3)
    enable_ttt(model, TTTConfig(layers=[1], chunk_size=8, eta=0.5))
    randomise_ttt_parameters(model, seed=4)
    ids = torch.randint(0, 101, (2, 27))
    want = reference_logits(model, ids)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("target", ["hidden_states", "input_embeddings"])
@pytest.mark.parametrize("use_proj", [True, False])
def test_targets_and_projection_match_reference(target, use_proj):
    model = tiny_model("qwen3", seed=5)
    enable_ttt(model, TTTConfig(layers=[0, 1, 2], chunk_size=4, eta=1.3, target=target, use_proj=use_proj))
    randomise_ttt_parameters(model, seed=6)
    ids = torch.randint(0, 101, (3, 19))
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, reference_logits(model, ids)) < 1e-5


def test_input_embeddings_target_accepts_inputs_embeds():
    model = tiny_model("llama", seed=8)
    enable_ttt(model, TTTConfig(layers=[0], chunk_size=4, target="input_embeddings"))
    randomise_ttt_parameters(model)
    ids = torch.randint(0, 101, (1, 13))
    with torch.no_grad():
        by_ids = model(input_ids=ids).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.allclose(by_ids, by_embeds)


def test_reference_mlp_is_causal_across_chunks():
    """Changing a token changes no output before the end of its own chunk (conv looks ahead)."""
    torch.manual_seed(0)
    d, D, C, T = 6, 10, 4, 16
    args = [torch.randn(D, d), torch.randn(D, d), torch.randn(d, D), torch.randn(d, 5), torch.randn(d, d)]
    x = torch.randn(T, d)
    base, _ = reference_ttt_mlp(x, x, *args, eta=1.0, chunk=C, act=torch.nn.functional.silu)
    x2 = x.clone()
    x2[5] += 1.0  # chunk 1 (tokens 4..7)
    moved, _ = reference_ttt_mlp(x2, x2, *args, eta=1.0, chunk=C, act=torch.nn.functional.silu)
    assert torch.equal(base[:5], moved[:5])
    assert torch.equal(base[6:8], moved[6:8])
    assert not torch.allclose(base[8:], moved[8:])


def test_unsupported_family_lists_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, qwen3"):
        enable_ttt(model, TTTConfig())


def test_default_layers_are_every_sixth():
    model = tiny_model("qwen2", layers=13)
    enable_ttt(model, TTTConfig())
    assert sorted(ttt_layers(model)) == [0, 6, 12]
    assert model.config.ttt["layers"] == [0, 6, 12]


def test_remembered_ttt_layers_follow_every_swap_of_the_mlps():
    from ttt_model.model.patch import disable_ttt, has_ttt, static_mode

    model = tiny_model("qwen3", layers=7)
    assert not has_ttt(model)
    enable_ttt(model, TTTConfig(layers=[1, 4]))
    first = ttt_layers(model)
    assert sorted(first) == [1, 4] and ttt_layers(model) == first
    with static_mode(model):  # the TTT MLPs are detached: none is found, none remembered
        assert not has_ttt(model)
    assert ttt_layers(model) == first
    disable_ttt(model)
    assert not has_ttt(model)
    enable_ttt(model, TTTConfig(layers=[2]))
    again = ttt_layers(model)
    assert sorted(again) == [2] and all(m is model.model.layers[i].mlp for i, m in again.items())


def test_ttt_parameter_names_and_initialisation():
    model = tiny_model("qwen3")
    enable_ttt(model, TTTConfig(layers=[1]))
    names = {n for n, _ in model.named_parameters() if ".ttt_" in n}
    assert names == {"model.layers.1.mlp.ttt_conv.weight", "model.layers.1.mlp.ttt_proj.weight"}
    mlp = model.model.layers[1].mlp
    assert mlp.ttt_conv.weight.shape == (32, 1, 5) and not mlp.ttt_conv.weight.any()
    proj = mlp.ttt_proj.weight
    assert torch.equal(proj, torch.diag(torch.diagonal(proj))) and torch.diagonal(proj).abs().sum() > 0


class LiveWeightCounter:
    """Counts how many (d, D) tensors are alive at once while ops run (a TorchDispatchMode)."""

    def __init__(self, shape):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.shape, self.refs, self.max_live = tuple(shape), [], 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and tuple(t.shape[-2:]) == counter.shape:
                        counter.refs.append(weakref.ref(t))
                live = {r().untyped_storage().data_ptr() for r in counter.refs if r() is not None}
                counter.max_live = max(counter.max_live, len(live))
                return out

        self.mode = Mode()


@pytest.mark.parametrize("chunks", [4, 32])
def test_parallel_form_keeps_no_per_chunk_weight_matrices(chunks):
    """The forward holds a bounded number of d x D matrices, whatever the number of chunks."""
    model = tiny_model("qwen3", layers=1)
    enable_ttt(model, TTTConfig(layers=[0], chunk_size=4))
    randomise_ttt_parameters(model)
    mlp = model.model.layers[0].mlp
    counter = LiveWeightCounter(mlp.down_proj.weight.shape)
    with torch.no_grad(), counter.mode:
        mlp(torch.randn(1, 4 * chunks, 32))
    assert 0 < counter.max_live <= 4


def test_training_forward_matches_reference_and_inference_path():
    """With autograd on (training), the general loop gives the reference's numbers too."""
    model = tiny_model("qwen2", seed=21)
    enable_ttt(model, TTTConfig(layers=[0, 2], chunk_size=8, eta=0.7))
    randomise_ttt_parameters(model, seed=22)
    ids = torch.randint(0, 101, (2, 30))
    trained = model(ids).logits
    assert trained.requires_grad
    with torch.no_grad():
        inference = model(ids).logits
    assert rel_err(trained.detach(), reference_logits(model, ids)) < 1e-5
    assert rel_err(trained.detach(), inference) < 1e-6
    trained.sum().backward()
    conv_grad = model.model.layers[0].mlp.ttt_conv.weight.grad
    assert conv_grad is not None and conv_grad.abs().sum() > 0


def test_zero_initialised_conv_receives_a_gradient():
    """Training from the paper's init (conv = 0) must move the conv: dW depends on it linearly."""
    model = tiny_model("qwen3", seed=30)
    enable_ttt(model, TTTConfig(layers=[0, 1], chunk_size=4, target="input_embeddings"))
    ids = torch.randint(0, 101, (2, 20))
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for idx in (0, 1):
        grad = model.model.layers[idx].mlp.ttt_conv.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_cached_conv_taps_follow_the_weight_and_eta():
    """Without autograd the taps are computed once per weight: an in-place change of the conv (an
    optimiser step, a loaded checkpoint) or of eta must reach the next forward."""
    model = tiny_model("qwen3", seed=40)
    enable_ttt(model, TTTConfig(layers=[1], chunk_size=4, eta=0.9))
    randomise_ttt_parameters(model, seed=41)
    ids = torch.randint(0, 101, (1, 21))
    with torch.no_grad():
        model(ids)  # fills the cache
        mlp = ttt_layers(model)[1]
        mlp.ttt_conv.weight.mul_(-2.0)
        assert rel_err(model(ids).logits, reference_logits(model, ids)) < 1e-5
        mlp.config.eta = 0.3
        assert rel_err(model(ids).logits, reference_logits(model, ids)) < 1e-5
        assert torch.equal(mlp.conv_taps(), (0.3 * mlp.ttt_conv.weight[:, 0, :].t()).contiguous())
