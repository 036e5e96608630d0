"""The training path on a tiny model: data preparation, resume, checkpoints without pickle."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ttt_model import TTTConfig, enable_ttt, has_ttt, load_ttt_model
from ttt_model.data import PackedTokenStream
from ttt_model.training.train import TrainConfig, adamw_optimizer, fit, lr_at, prepare, load_prepared, load_tokenizer
from tests.conftest import ROOT
from tests.sample_text import SAMPLE_TEXT



def tiny_scratch_model(seed=0):
    from tests.ttt_model.reference import tiny_model

    model = tiny_model("qwen3", seed=seed, layers=2)
    return enable_ttt(model, TTTConfig(layers=[1], chunk_size=8, target="input_embeddings"))


def stream(seed=0):
    # Documents that repeat a short random motif: there is something to learn.
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(20):
        motif = torch.randint(1, 101, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        docs.append(motif * 20)
    return PackedTokenStream(docs, eos_id=0, seq_len=32, seed=seed)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_ttt_parameters_take_their_own_lr_scale_and_keep_their_weight_decay():
    model = tiny_scratch_model()
    optimizer = adamw_optimizer(model, TrainConfig(ttt_lr_scale=10.0, weight_decay=0.1))
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        group = group_of[id(p)]
        assert group["lr_scale"] == (10.0 if ".ttt_" in name else 1.0), name
        assert group["weight_decay"] == (0.0 if p.dim() < 2 or "ttt_conv" in name else 0.1), name
    assert len(group_of) == sum(1 for _ in model.parameters())


def test_training_lowers_loss_and_moves_the_ttt_conv(tmp_path):
    model = tiny_scratch_model()
    cfg = TrainConfig(seq_len=32, batch_size=4, max_steps=30, lr=3e-3, warmup_steps=3, log_every=5,
                      checkpoint_every=100, bf16=False)
    fit(model, stream(), cfg, tmp_path, device="cpu")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.3
    assert model.model.layers[1].mlp.ttt_conv.weight.abs().sum() > 0


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    cfg = TrainConfig(seq_len=32, batch_size=2, max_steps=6, warmup_steps=2, checkpoint_every=100, log_every=2,
                      bf16=False)
    fit(tiny_scratch_model(), stream(), cfg, tmp_path / "a", device="cpu")
    assert fit(tiny_scratch_model(), stream(), cfg, tmp_path / "b", device="cpu", stop_at_step=3) is None
    # A differently initialised model: everything must come from the checkpoint.
    fit(tiny_scratch_model(seed=99), stream(), cfg, tmp_path / "b", device="cpu")
    straight, resumed = load_ttt_model(tmp_path / "a" / "final"), load_ttt_model(tmp_path / "b" / "final")
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    model = tiny_scratch_model()
    cfg = TrainConfig(seq_len=32, batch_size=2, max_steps=2, warmup_steps=1, checkpoint_every=1, bf16=False)
    fit(model, stream(), cfg, tmp_path, device="cpu")
    files = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    moments = load_file(str(tmp_path / "checkpoint" / "optimizer.safetensors"))
    assert any(k.endswith("::exp_avg") for k in moments)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


def write_readme_corpus(corpus: Path) -> str:
    """A train/heldout corpus of overlapping slices of the sample text (CI has no built corpus); that text."""
    corpus.mkdir()
    text = SAMPLE_TEXT
    for split, n in (("train", 6), ("heldout", 2)):
        with open(corpus / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{split}-{i}", "text": text[i * 300 :]}) + "\n")
    return text


def test_prepare_trains_a_tokenizer_and_round_trips_documents(tmp_path):
    corpus = tmp_path / "corpus"
    text = write_readme_corpus(corpus)
    summary = prepare(corpus, tmp_path / "prepared", vocab_size=400)
    assert summary["heldout"]["documents"] == 2
    tokenizer = load_tokenizer(tmp_path / "prepared" / "tokenizer")
    ids = load_prepared(tmp_path / "prepared", "heldout")
    assert tokenizer.decode(ids[1]) == text[300:]


def test_aligned_stream_starts_every_document_on_a_chunk_border():
    docs = [list(range(1, 6)), list(range(10, 27)), list(range(30, 45)), list(range(50, 66))]  # 5, 17, 15, 16 tokens
    aligned = PackedTokenStream(docs, eos_id=0, seq_len=16, seed=0, align=8)
    # Each document cut to whole chunks with its EOS kept; the 5-token one is shorter than a chunk.
    assert aligned.tokens.tolist() == (
        list(range(10, 25)) + [0] + list(range(30, 45)) + [0] + list(range(50, 65)) + [0]
    )
    assert aligned.starts.nonzero().flatten().tolist() == [0, 16, 32]
    for step in range(20):
        window = aligned.batch(step, 0, 3)
        assert window.ids.shape == window.document_start.shape == (3, 17)
        # Every window starts on a chunk border, so document starts fall on chunk starts only.
        assert not window.document_start[:, 1:16][:, torch.arange(1, 16) % 8 != 0].any()
    with pytest.raises(ValueError, match="multiple of align"):
        PackedTokenStream(docs, eos_id=0, seq_len=12, seed=0, align=8)


def test_document_restarts_serve_each_document_as_if_alone():
    from ttt_model.model.forward_call import current_call, ttt_forward
    from ttt_model.training.train import document_restarts
    from ttt_model.data import TokenWindows
    from tests.ttt_model.reference import randomise_ttt_parameters

    model = tiny_scratch_model()
    randomise_ttt_parameters(model)
    mlp = model.model.layers[1].mlp
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, mlp.hidden_size, generator=gen)
    embeds = torch.randn(2, 32, mlp.hidden_size, generator=gen)
    starts = torch.zeros(2, 33, dtype=torch.bool)
    starts[0, [0, 16]] = True  # row 0: two documents of 16 tokens; row 1: one document
    starts[1, 0] = True
    window = TokenWindows(torch.zeros(2, 33, dtype=torch.long), starts)
    with ttt_forward(input_embeds=embeds):
        with document_restarts(window, chunk=8):
            assert current_call().document_starts is not None
            packed = mlp(x)
        assert current_call().document_starts is None
        whole = mlp(x)
    with ttt_forward(input_embeds=embeds[:1, :16]):
        first = mlp(x[:1, :16])
    with ttt_forward(input_embeds=embeds[:1, 16:]):
        second = mlp(x[:1, 16:])
    torch.testing.assert_close(packed[0], torch.cat([first, second], dim=1)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed[1], whole[1], rtol=1e-6, atol=1e-6)
    # Without the restart the second document would see the first one's updates.
    assert not torch.allclose(whole[0, 16:], packed[0, 16:], atol=1e-4)


def test_training_on_aligned_windows_lowers_loss(tmp_path):
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 101, (5,), generator=gen).tolist() * int(torch.randint(3, 9, (1,), generator=gen))
            for _ in range(20)]
    aligned = PackedTokenStream(docs, eos_id=0, seq_len=32, seed=0, align=8)
    model = tiny_scratch_model()
    cfg = TrainConfig(seq_len=32, batch_size=4, max_steps=30, lr=3e-3, warmup_steps=3, log_every=5,
                      checkpoint_every=100, bf16=False)
    fit(model, aligned, cfg, tmp_path, device="cpu")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.3
    assert model.model.layers[1].mlp.ttt_conv.weight.abs().sum() > 0


def test_large_ttt_gradients_do_not_shrink_the_other_weights_steps():
    from ttt_model.training.train import clip_gradients

    model = tiny_scratch_model()
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=gen) * (10.0 if ".ttt_" in name else 1e-4)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if ".ttt_" not in n}
    norm, ttt_norm = clip_gradients(model, 1.0)
    assert norm < 1.0 and ttt_norm > 10.0  # the norms before clipping
    for n, p in model.named_parameters():
        if ".ttt_" not in n:
            assert torch.equal(p.grad, before[n]), n
    ttt = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".ttt_" in n])
    assert torch.linalg.vector_norm(ttt).item() == pytest.approx(1.0, rel=1e-4)


def test_continual_training_from_the_command_line_takes_the_ttt_recipe(tmp_path):
    """`fit --from` switches TTT on with the given target, eta and safeguards; they are trained
    with and saved in the model's config, and the TTT lr scale in the trainer state."""
    from ttt_model.model.patch import ttt_config_of
    from ttt_model.training.train import main

    write_readme_corpus(tmp_path / "corpus")
    prepare(tmp_path / "corpus", tmp_path / "prepared", vocab_size=400)
    common = ["--data", str(tmp_path / "prepared"), "--seq-len", "64", "--batch-size", "2", "--chunk-size", "16",
              "--max-steps", "2", "--warmup-steps", "1", "--no-bf16"]
    base = main(["fit", *common, "--from-scratch", "--no-ttt", "--out", str(tmp_path / "base")])
    assert not has_ttt(load_ttt_model(base))
    final = main(["fit", *common, "--from", str(base), "--ttt", "--ttt-layers", "1", "--eta", "3",
                  "--ttt-target", "input_embeddings", "--ttt-max-delta-ratio", "0.2", "--ttt-decay", "0.1",
                  "--ttt-lr-scale", "4", "--out", str(tmp_path / "cont")])
    config = ttt_config_of(load_ttt_model(final))
    assert (config.layers, config.eta, config.target) == ([1], 3.0, "input_embeddings")
    assert (config.max_delta_ratio, config.decay, config.chunk_size) == (0.2, 0.1, 16)
    state = json.loads((tmp_path / "cont" / "checkpoint" / "trainer_state.json").read_text())
    assert state["train_config"]["ttt_lr_scale"] == 4.0


def test_the_train_and_eval_flags_default_to_the_ttt_config():
    from ttt_model.training.evaluate import build_parser as eval_parser
    from ttt_model.training.train import build_parser as train_parser

    ttt = TTTConfig()
    fit_args = train_parser().parse_args(["fit", "--from-scratch", "--out", "x"])
    assert (fit_args.chunk_size, fit_args.eta, fit_args.ttt_layers) == (ttt.chunk_size, ttt.eta, ttt.layers)
    assert (fit_args.ttt_decay, fit_args.ttt_max_delta_ratio) == (ttt.decay, ttt.max_delta_ratio)
    eval_args = eval_parser().parse_args(["--model", "m", "--out", "x"])
    assert (eval_args.gradient_lr, eval_args.gradient_steps, eval_args.gradient_optimizer) == (
        ttt.gradient_lr, ttt.gradient_steps, ttt.gradient_optimizer)
    assert (eval_args.gradient_chunk, eval_args.max_delta_ratio, eval_args.max_update_norm) == (
        ttt.chunk_size, ttt.max_delta_ratio, ttt.max_update_norm)
