"""Exponential moving average of the weights, the ones sampled from (Ho et al. 2020, App. B)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(decay: float, warmup: int, step: int) -> float:
    """The decay applied at `step`: min(decay, (1 + step) / (warmup + step)), or `decay` itself when warmup is 0."""
    return decay if warmup <= 0 else min(decay, (1 + step) / (warmup + step))


def initial_share(decay: float, warmup: int, steps: int) -> float:
    """The weight the EMA still gives the initial weights after `steps` updates: the product of the decays."""
    share = 1.0
    for step in range(steps):
        share *= ema_decay(decay, warmup, step)
        if share < 1e-6:  # gone for any purpose; long runs end here early
            return share
    return share


class EMA:
    """shadow <- d shadow + (1 - d) theta, with d = min(decay, (1 + step) / (warmup + step)).

    The warm-up (TensorFlow's ExponentialMovingAverage `num_updates` rule) keeps the average from
    being dominated by the random initial weights early in training; warmup=0 disables it.
    """

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: int = 10):
        if not 0 <= decay < 1:
            raise ValueError(f"train.ema.decay={decay} must lie in [0, 1)")
        self.decay, self.warmup = decay, warmup
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return ema_decay(self.decay, self.warmup, step)

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        ema_params, params = list(self.net.parameters()), list(net.parameters())
        torch._foreach_lerp_(ema_params, params, 1 - self.decay_at(step))  # one fused kernel, no host sync
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)
