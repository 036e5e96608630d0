"""Pretraining from scratch and continual training of causal LMs with In-Place TTT switched on.

    python -m ttt_model.training.train prepare --corpus data/corpus --out data/prepared
    python -m ttt_model.training.train fit --data data/prepared --out runs/ttt-s0 --from-scratch --ttt --seed 0
    python -m ttt_model.training.train fit --data data/prepared --out runs/cont --from runs/base/final --ttt \
        --ttt-target input_embeddings --eta 3 --ttt-max-delta-ratio 0.2

``prepare`` trains a byte-level BPE tokenizer on the training documents and stores every document
as token ids (safetensors). ``fit`` runs AdamW with linear warm-up and cosine decay, gradient
clipping and accumulation, bf16 autocast where the device has it, a progress bar, metrics as
JSON lines, and checkpoints (safetensors + JSON, never pickle) it resumes from.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ttt_model.config import TTTConfig
from ttt_model.data import PackedTokenStream, TokenWindows, load_documents
from ttt_model.model.forward_call import ttt_forward
from ttt_model.model.patch import enable_ttt, has_ttt, is_ttt_parameter, load_ttt_model, ttt_config_of

log = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]

# From-scratch architectures (Qwen3). "tiny" is the embedded default: ~7M parameters.
MODEL_PRESETS = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
}


@dataclass
class TrainConfig:
    seq_len: int = 8192
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # The TTT conv and projection's lr relative to ``lr``: in continual training they start from
    # zero next to pretrained weights, and at the same lr they learn little in a short run.
    ttt_lr_scale: float = 1.0
    bf16: bool = True
    checkpoint_every: int = 250
    log_every: int = 10
    seed: int = 0
    # Cut documents to whole TTT chunks and restart the fast weights at each (see PackedTokenStream).
    align_documents: bool = True


# -- data preparation ------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def prepare(corpus_dir: Path, out_dir: Path, vocab_size: int = 8192) -> dict:
    """Tokenizer + token ids of every train and held-out document, written to ``out_dir``."""
    train_docs = load_documents(corpus_dir / "train.jsonl")
    heldout_docs = load_documents(corpus_dir / "heldout.jsonl")
    tokenizer = train_tokenizer([d.text for d in train_docs], vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    summary = {"vocab_size": len(tokenizer), "corpus": str(corpus_dir)}
    for split, docs in (("train", train_docs), ("heldout", heldout_docs)):
        ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
        # int16 holds ids below 32768 and halves the file; load_prepared widens them again.
        dtype = torch.int16 if len(tokenizer) <= 32768 else torch.int32
        flat = torch.tensor([t for doc in ids for t in doc], dtype=dtype)
        lengths = torch.tensor([len(doc) for doc in ids], dtype=torch.int64)
        save_file({"tokens": flat, "lengths": lengths}, str(out_dir / f"{split}.safetensors"))
        (out_dir / f"{split}_ids.json").write_text(json.dumps([d.id for d in docs]))
        summary[split] = {"documents": len(docs), "tokens": int(lengths.sum())}
    (out_dir / "prepared.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_prepared(data_dir: Path, split: str) -> list[torch.Tensor]:
    """Token ids per document of one split written by ``prepare`` (views of one int64 tensor)."""
    tensors = load_file(str(data_dir / f"{split}.safetensors"))
    return list(torch.split(tensors["tokens"].to(torch.int64), tensors["lengths"].tolist()))


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


# -- models ------------------------------------------------------------------------------------------


def scratch_model(preset: str, vocab_size: int, eos_id: int, max_positions: int, seed: int):
    """A freshly initialised Qwen3-architecture model of a named size."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, rope_theta=100_000.0,
        **MODEL_PRESETS[preset],
    )
    return AutoModelForCausalLM.from_config(config)


# -- the loop ----------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and the TTT conv taps (1-D or tiny tensors); the TTT
    parameters in groups of their own whose lr is ``ttt_lr_scale`` times the schedule's."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = not (p.dim() < 2 or "ttt_conv" in name)
            groups.setdefault((decays, is_ttt_parameter(name)), []).append(p)
    return torch.optim.AdamW(
        [
            {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0,
             "lr_scale": cfg.ttt_lr_scale if ttt else 1.0}
            for (decays, ttt), params in sorted(groups.items())
        ],
        lr=cfg.lr, betas=(0.9, 0.95), fused=torch.cuda.is_available(),
    )


def save_checkpoint(path: Path, model, optimizer, step: int, cfg: TrainConfig, tokenizer=None) -> None:
    """Model (HF safetensors), optimizer moments (safetensors) and trainer state (JSON)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors = {}
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "train_config": asdict(cfg)}, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def load_optimizer_state(path: Path, model, optimizer) -> None:
    tensors = load_file(str(path / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, state_key = key.split("::")
        p = params[name]
        optimizer.state[p][state_key] = value.to(p.device) if state_key != "step" else value


def clip_gradients(model: torch.nn.Module, max_norm: float) -> tuple[float, float | None]:
    """Clip the model's gradients and the TTT parameters' gradients each to ``max_norm``.

    Separately, because the fresh TTT conv and projection can have gradients many times larger
    than the rest (norm 3-90 against 0.4 when TTT is switched on for a trained model): one global
    norm would then shrink every other weight's step by that factor. Returns both norms.
    """
    ttt, rest = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (ttt if is_ttt_parameter(name) else rest).append(p)
    norm = torch.nn.utils.clip_grad_norm_(rest, max_norm).item()
    return norm, torch.nn.utils.clip_grad_norm_(ttt, max_norm).item() if ttt else None


def restart_chunk(model, stream: PackedTokenStream) -> int | None:
    """The TTT chunk size at whose borders the fast weights restart in this stream's windows
    (None: no TTT, or windows that are not document-aligned)."""
    if not has_ttt(model) or stream.starts is None:
        return None
    chunk = ttt_config_of(model).chunk_size
    if stream.align != chunk:
        raise ValueError(f"the stream is aligned to {stream.align} tokens, the model's TTT chunk is {chunk}")
    return chunk


@contextmanager
def document_restarts(window: TokenWindows, chunk: int | None):
    """Restart the fast weights at every document start of a document-aligned window."""
    if chunk is None:
        yield
        return
    with ttt_forward(document_starts=window.document_start[:, :-1][:, ::chunk]):
        yield


def fit(
    model, stream: PackedTokenStream, cfg: TrainConfig, out_dir: Path, tokenizer=None,
    on_metrics: MetricsCallback | None = None, device: str | None = None, stop_at_step: int | None = None,
) -> Path | None:
    """Train ``model`` on windows of ``stream``; resume from ``out_dir/checkpoint`` if it exists.

    ``stop_at_step`` ends the run early after a checkpoint (a time-boxed slice of a longer run);
    calling again resumes it on the same schedule. Returns the final model dir when finished.
    """
    from tqdm import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    optimizer = adamw_optimizer(model, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint"
    step = 0
    if (ckpt / "trainer_state.json").exists():
        state = json.loads((ckpt / "trainer_state.json").read_text())
        resumed = load_ttt_model(ckpt).to(device)
        model.load_state_dict(resumed.state_dict())
        load_optimizer_state(ckpt, model, optimizer)
        step = state["step"]
        log.info("resumed from %s at step %d", ckpt, step)
    autocast = cfg.bf16 and device == "cuda" and torch.cuda.is_bf16_supported()
    chunk = restart_chunk(model, stream)
    metrics_file = open(out_dir / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=None)
    t0, tokens_done = time.perf_counter(), 0
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        total = 0.0
        for micro in range(cfg.grad_accum):
            window = stream.batch(step, micro, cfg.batch_size).to(device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast), \
                    document_restarts(window, chunk):
                logits = model(input_ids=window.ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), window.ids[:, 1:].flatten()) / cfg.grad_accum
            loss.backward()
            total += loss.item()
            tokens_done += window.ids[:, 1:].numel()
        grad_norm, ttt_grad_norm = clip_gradients(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - t0
            metrics = {"loss": total, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_done / elapsed}
            if ttt_grad_norm is not None:
                metrics["ttt_grad_norm"] = ttt_grad_norm
            metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{total:.3f}")
            if on_metrics:
                on_metrics(step, metrics)
        if step % cfg.checkpoint_every == 0 or step in (cfg.max_steps, stop_at_step):
            save_checkpoint(ckpt, model, optimizer, step, cfg, tokenizer)
        if step == stop_at_step:
            break
    bar.close()
    metrics_file.close()
    if step < cfg.max_steps:
        return None
    final = out_dir / "final"
    model.save_pretrained(final)
    if tokenizer is not None:
        tokenizer.save_pretrained(final)
    return final


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttt-stream train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="train the tokenizer and tokenize the corpus")
    prep.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    prep.add_argument("--out", type=Path, default=Path("data/prepared"))
    prep.add_argument("--vocab-size", type=int, default=8192)
    run = sub.add_parser("fit", help="pretrain from scratch or continue training a model")
    run.add_argument("--data", type=Path, default=Path("data/prepared"))
    run.add_argument("--out", type=Path, required=True)
    origin = run.add_mutually_exclusive_group(required=True)
    origin.add_argument("--from-scratch", action="store_true", help="new model (TTT target: input embeddings)")
    origin.add_argument("--from", dest="from_model", type=Path, help="existing model dir (target: hidden states)")
    run.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="tiny")
    run.add_argument("--ttt", action=argparse.BooleanOptionalAction, default=True)
    ttt = TTTConfig()  # the flags' defaults: one source of truth
    run.add_argument("--ttt-layers", type=int, nargs="+", default=ttt.layers)
    run.add_argument("--chunk-size", type=int, default=ttt.chunk_size)
    run.add_argument("--eta", type=float, default=ttt.eta)
    run.add_argument("--ttt-target", choices=["hidden_states", "input_embeddings"], default=None,
                     help="what the fast weights learn to write (default: input_embeddings from scratch, "
                     "hidden_states for --from)")
    run.add_argument("--ttt-decay", type=float, default=ttt.decay, help="trained with this decay per chunk update")
    run.add_argument("--ttt-max-delta-ratio", type=float, default=ttt.max_delta_ratio,
                     help="trained with ||sum dW|| / ||W_down|| capped at this")
    for field, default in asdict(TrainConfig()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(default, bool):
            run.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            run.add_argument(flag, type=type(default), default=default)
    return parser


def main(argv: list[str] | None = None, on_metrics: MetricsCallback | None = None) -> Path | dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        summary = prepare(args.corpus, args.out, args.vocab_size)
        print(json.dumps(summary, indent=2))
        return summary
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    tokenizer = load_tokenizer(args.data / "tokenizer")
    if args.from_scratch:
        model = scratch_model(args.preset, len(tokenizer), tokenizer.eos_token_id, max(cfg.seq_len, 32768), cfg.seed)
        target = args.ttt_target or "input_embeddings"
    else:
        model = load_ttt_model(args.from_model)
        target = args.ttt_target or "hidden_states"
    if args.ttt and not has_ttt(model):
        enable_ttt(model, TTTConfig(layers=args.ttt_layers, chunk_size=args.chunk_size, eta=args.eta, target=target,
                                    decay=args.ttt_decay, max_delta_ratio=args.ttt_max_delta_ratio))
    torch.manual_seed(cfg.seed)
    chunk = ttt_config_of(model).chunk_size if has_ttt(model) else args.chunk_size
    align = chunk if cfg.align_documents else None
    stream = PackedTokenStream(load_prepared(args.data, "train"), tokenizer.eos_token_id, cfg.seq_len, cfg.seed, align)
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "run_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    log.info("training %d parameters on %d tokens", sum(p.numel() for p in model.parameters()), len(stream))
    return fit(model, stream, cfg, args.out, tokenizer, on_metrics)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
