"""Training losses: regress the network onto its prediction target along the path."""

from __future__ import annotations

import torch

from .paths import Path
from .prediction import target


def denoising_loss(net, path: Path, prediction: str, x0: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
    """E_{t, x1} || net(x_t, t) - target ||^2, DDPM's simple loss for eps (Ho et al. 2020, eq. 14).

    The target is the network's own prediction kind (eps, x0, v, ...), built from the same
    (x0, x1, t) that made x_t, so every parameterization trains with one function.
    """
    t = path.sample_t(x0.shape[0], generator, x0.device)
    x1 = path.sample_prior(x0.shape, generator, x0.device)
    x_t = path.marginal(x0, x1, t)
    out = net(x_t, t)
    return (out.float() - target(prediction, path, x0, x1, t).float()).square().mean()
