"""Losses and optimisers of the gradient objective (dynamic evaluation) on fast weights.

The in-place objective needs none of this: its update is the closed-form dW = eta V^T h inside
``InPlaceTTTMLP``. The gradient objective instead takes optimiser steps of a loss on the fast
weights (the ``delta`` of each TTT layer), which adapts any pretrained model with no trained
TTT parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttt_model.config import TTTConfig


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting input_ids[:, 1:] from logits[:, :-1]."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1))


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the predictive distributions (needs no labels)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def gradient_objective_loss(config: TTTConfig, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    if config.gradient_loss == "entropy":
        return entropy_loss(logits)
    return next_token_loss(logits, input_ids)


def make_optimizer(config: TTTConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.gradient_optimizer == "adam":
        return torch.optim.Adam(params, lr=config.gradient_lr)
    return torch.optim.SGD(params, lr=config.gradient_lr)
