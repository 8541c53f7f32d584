"""Auxiliary heads and the local losses they are trained with.

A block's head predicts the targets from the block's output (global average pooling then a dense
layer by default). Its local loss is softmax cross-entropy; its gradient is computed here in closed
form, with the targets given explicitly or recovered from the output error (see the package docstring).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError, FeedbackSignalError
from ..functional import targets_from_error


class _GlobalAvgPool(nn.Module):
    def forward(self, x):
        return x.flatten(2).mean(-1)


class _TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


def aux_head(shape: Tuple[int, ...], out_shape: Tuple[int, ...], pool: str) -> Tuple[nn.Module, str]:
    """An auxiliary head for a block output of (probe) ``shape`` predicting like the output layer."""
    n_out = out_shape[-1]
    rank = len(shape)
    if pool == "auto":  # (N, C, H, W...): feature map; (N, T, D): sequence; (N, D): vector
        if rank >= 4:
            pool = "avg"
        elif rank == 3:
            pool = "token" if len(out_shape) == 3 else "mean"
        else:
            pool = "token"
    if pool == "avg":
        if rank < 3:
            raise ConfigError([f"pool: 'avg' needs a feature map (N, C, ...), the block output has shape {shape}"],
                              what="blockwise configuration")
        return nn.Sequential(_GlobalAvgPool(), nn.Linear(shape[1], n_out)), pool
    if pool == "mean":
        if rank != 3:
            raise ConfigError([f"pool: 'mean' needs a sequence (N, T, D), the block output has shape {shape}"],
                              what="blockwise configuration")
        return nn.Sequential(_TokenMean(), nn.Linear(shape[-1], n_out)), pool
    if pool == "flatten":
        return nn.Sequential(nn.Flatten(), nn.Linear(int(math.prod(shape[1:])), n_out)), pool
    return nn.Linear(shape[-1], n_out), pool  # token: a dense layer on the last dimension


def recover_targets(error: torch.Tensor) -> torch.Tensor:
    """Targets from a softmax cross-entropy output error ``(N, C)``: the index of each row's negative entry.

    Rows that are all zero (no loss on them) get ``-100``. Raises
    :class:`~bio_ext.errors.FeedbackSignalError` for a row with no negative entry.
    """
    return targets_from_error(error, "blockwise: the local losses",
                              "Pass the targets before the forward: bio_ext.blockwise.set_targets(model, y)")


def local_grad(aux: torch.Tensor, targets: torch.Tensor, weight: float) -> Tuple[torch.Tensor, float]:
    """Gradient and value of ``weight * mean cross-entropy(aux, targets)`` over rows with a target (>= 0)."""
    a = aux.detach().reshape(-1, aux.shape[-1])
    t = targets.reshape(-1).to(a.device)
    if t.numel() != a.shape[0]:
        raise FeedbackSignalError(
            f"blockwise: {t.numel()} target(s) for an auxiliary head with {a.shape[0]} row(s); the targets must have "
            "one entry per row of the model output (flattened over tokens for sequence outputs)")
    valid = t >= 0
    n = int(valid.sum())
    logp = torch.log_softmax(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a, dim=1)
    g = logp.exp()
    rows = valid.nonzero().squeeze(1)
    g[rows, t[rows]] -= 1.0
    g[~valid] = 0.0
    value = float(-(logp[rows, t[rows]]).sum()) * weight / max(n, 1)
    g = g * (weight / max(n, 1))
    return g.to(aux.dtype).reshape(aux.shape), value
