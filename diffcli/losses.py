"""Training losses: regress the network onto its target along the path, with optional weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import DiffcliError
from .paths import ProbabilityPath, expand
from .prediction import SIGMA_DATA, convert, edm_scale, net_inputs, target


def _edm_weight(path: ProbabilityPath, t, sigma_data: float, snr_gamma: float):
    """(s^2 + sd^2) / (s sd)^2 at s = sigma/alpha, i.e. 1 / c_out^2 (Karras et al. 2022, Table 1), in a form finite
    at alpha = 0."""
    return (edm_scale(path.alpha(t), path.sigma(t), sigma_data) / (sigma_data * path.sigma(t))) ** 2


def _min_snr_weight(path: ProbabilityPath, t, sigma_data: float, snr_gamma: float):
    """min(SNR, gamma), SNR = alpha^2 / sigma^2 (Hang et al. 2023, Min-SNR-gamma, weight on the x0 error)."""
    return torch.clamp((path.alpha(t) / path.sigma(t)) ** 2, max=snr_gamma)


# weighting -> (the error it weights, lambda(path, t, sigma_data, snr_gamma)); the error is
#   None:    the network's own target, unweighted
#   "score": lambda(t) ||score(net) - grad log p(x_t | x0)||^2 (denoising score matching)
#   "x0":    lambda(t) ||x0_hat(net) - x0||^2
WEIGHTINGS = {
    "simple": (None, None),  # plain MSE on the network's own target (DDPM's L_simple, conditional flow matching, EDM's F)
    "sigma2": ("score", lambda path, t, sd, gamma: path.sigma(t) ** 2),  # Song & Ermon 2019, eq. 6; Song et al. 2021, eq. 7
    "likelihood": ("score", lambda path, t, sd, gamma: path.g2(t)),  # Song et al. 2021b ("maximum likelihood training")
    "edm": ("x0", _edm_weight),
    "min_snr": ("x0", _min_snr_weight),
}


def check_weighting(weighting: str, path: ProbabilityPath) -> str:
    """Validate a weighting for this path with a one-line error."""
    if weighting not in WEIGHTINGS:
        raise DiffcliError(f"model.weighting={weighting} is unknown; choose one of {', '.join(WEIGHTINGS)}")
    if WEIGHTINGS[weighting][0] == "score" and not path.gaussian_prior:
        raise DiffcliError(f"model.weighting={weighting} weights a score-matching loss, which needs a Gaussian "
                           f"prior; this model's prior is {path.prior}: use model.weighting=simple, edm or min_snr")
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


def draw(path: ProbabilityPath, x0: torch.Tensor, generator: torch.Generator | None, coupling: str = "independent",
         times=None, x1: torch.Tensor | None = None):
    """(x0, x1, t) of one training batch: t ~ the path's training times (`times`: model.times, dist, mean and
    std; None: uniform), x1 ~ the prior, paired by `coupling`; or the given x1, already paired with x0 (reflow's
    pairs, Liu et al. 2023, sec. 2.2).

    Drawn for the whole global batch before it is split among GPUs and accumulation steps, so a
    run's randomness does not depend on how its batch is split.
    """
    t = path.sample_t(x0.shape[0], generator, x0.device, **(times or {}))
    if x1 is None:
        x1 = COUPLINGS[coupling](x0, path.sample_prior(x0.shape, generator, x0.device))
    return x0, x1, t


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Low-precision (autocast) outputs in float32 for the loss; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pair_loss(net, path: ProbabilityPath, prediction: str, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
              weighting: str = "simple", *, precond: str = "none", sigma_data: float = SIGMA_DATA,
              snr_gamma: float = 5.0, y: torch.Tensor | None = None) -> torch.Tensor:
    """The squared error of the net at x_t = alpha x0 + sigma x1 (fed under `precond`, with class labels y for a
    conditional net), averaged over the batch.

    `simple`: || net - target ||^2 on the network's own kind (eps, x0, v, velocity, F, ...): DDPM's eq. 14
    for eps, the conditional flow-matching loss for velocity, EDM's loss for F. Otherwise lambda(t) times the
    squared error of the score (denoising score matching) or of x0_hat, whatever the network predicts.
    """
    x_t = path.marginal(x0, x1, t)
    out = _at_least_float32(net(*net_inputs(net, path, x_t, t, precond, sigma_data), *(() if y is None else (y,))))
    kind, weight = WEIGHTINGS[weighting]
    if kind is None:
        return (out - _at_least_float32(target(prediction, path, x0, x1, t, sigma_data))).square().mean()
    error = convert(out, prediction, kind, path, _at_least_float32(x_t), t, sigma_data) - \
        _at_least_float32(target(kind, path, x0, x1, t, sigma_data))
    per_example = error.square().flatten(1).mean(1)
    return (expand(weight(path, t, sigma_data, snr_gamma), per_example) * per_example).mean()


def denoising_loss(net, path: ProbabilityPath, prediction: str, x0: torch.Tensor, generator: torch.Generator | None,
                   weighting: str = "simple", coupling: str = "independent", times=None, **options) -> torch.Tensor:
    """E_{t, x1} of the squared error of the net: pair_loss (with `options`: precond, sigma_data, snr_gamma) on a
    fresh draw of (x1, t) for x0."""
    return pair_loss(net, path, prediction, *draw(path, x0, generator, coupling, times), weighting, **options)


def classifier_loss(net, path: ProbabilityPath, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                    precond: str = "none", sigma_data: float = SIGMA_DATA, **_) -> torch.Tensor:
    """Cross-entropy of a noise-conditional classifier on x_t = alpha x0 + sigma x1 (fed under `precond`, as the
    model it guides is): the classifier p_t(y | x_t) of Dhariwal & Nichol 2021, sec. 4, on any path."""
    logits = net(*net_inputs(net, path, path.marginal(x0, x1, t), t, precond, sigma_data))
    return F.cross_entropy(_at_least_float32(logits), y.long())
