"""Training losses: regress the network onto its target along the path, with optional weighting."""

from __future__ import annotations

import torch

from . import DiffcliError
from .paths import Path, expand
from .prediction import convert, target

# weighting -> lambda(t) of the score-matching loss lambda(t) ||s_theta(x_t, t) - grad log p(x_t | x0)||^2
WEIGHTINGS = {
    "simple": None,  # plain MSE on the network's own target (DDPM's L_simple, conditional flow matching)
    "sigma2": lambda path, t: path.sigma(t) ** 2,  # Song & Ermon 2019, eq. 6; Song et al. 2021, eq. 7
    "likelihood": lambda path, t: path.g2(t),  # Song et al. 2021b ("maximum likelihood training")
}


def check_weighting(weighting: str, path: Path) -> str:
    """Validate a weighting for this path with a one-line error."""
    if weighting not in WEIGHTINGS:
        raise DiffcliError(f"model.weighting={weighting} is unknown; choose one of {', '.join(WEIGHTINGS)}")
    if WEIGHTINGS[weighting] is not None and path.prior != "gaussian":
        raise DiffcliError(f"model.weighting={weighting} weights a score-matching loss, which needs a Gaussian "
                           f"prior; this model's prior is {path.prior}: use model.weighting=simple")
    return weighting


def ot_coupling(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """x1 reordered to pair with x0 by an exact minimum-squared-distance assignment within the batch
    (mini-batch OT, Tong et al. 2023; Pooladian et al. 2023)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).float(), x1.flatten(1).float()).square()
    _, col = linear_sum_assignment(cost.cpu().numpy())  # rows come back sorted: x0[i] pairs x1[col[i]]
    return x1[torch.from_numpy(col).to(x1.device)]


COUPLINGS = {"independent": lambda x0, x1: x1, "ot": ot_coupling}


def check_coupling(coupling: str) -> str:
    if coupling not in COUPLINGS:
        raise DiffcliError(f"model.coupling={coupling} is unknown; choose one of {', '.join(COUPLINGS)}")
    return coupling


def draw(path: Path, x0: torch.Tensor, generator: torch.Generator | None, coupling: str = "independent"):
    """(x0, x1, t) of one training batch: t ~ the path's training times, x1 ~ the prior, paired by `coupling`.

    Drawn for the whole global batch before it is split among GPUs and accumulation steps, so a
    run's randomness does not depend on how its batch is split.
    """
    t = path.sample_t(x0.shape[0], generator, x0.device)
    x1 = COUPLINGS[coupling](x0, path.sample_prior(x0.shape, generator, x0.device))
    return x0, x1, t


def pair_loss(net, path: Path, prediction: str, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
              weighting: str = "simple") -> torch.Tensor:
    """The squared error of net(x_t, t) at x_t = alpha x0 + sigma x1, averaged over the batch.

    `simple`: || net - target ||^2 on the network's own kind (eps, x0, v, velocity, ...): DDPM's eq. 14
    for eps, the conditional flow-matching loss for velocity. Otherwise denoising score matching
    lambda(t) || score(net) - (-x1 / sigma) ||^2, whatever the network predicts.
    """
    x_t = path.marginal(x0, x1, t)
    out = net(x_t, t).float()
    if WEIGHTINGS[weighting] is None:
        return (out - target(prediction, path, x0, x1, t).float()).square().mean()
    score_error = convert(out, prediction, "score", path, x_t.float(), t) - target("score", path, x0, x1, t).float()
    per_example = score_error.square().flatten(1).mean(1)
    return (expand(WEIGHTINGS[weighting](path, t), per_example) * per_example).mean()


def denoising_loss(net, path: Path, prediction: str, x0: torch.Tensor, generator: torch.Generator | None,
                   weighting: str = "simple", coupling: str = "independent") -> torch.Tensor:
    """E_{t, x1} of the squared error of net(x_t, t): pair_loss on a fresh draw of (x1, t) for x0."""
    return pair_loss(net, path, prediction, *draw(path, x0, generator, coupling), weighting)
