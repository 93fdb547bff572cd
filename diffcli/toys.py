"""2D toys: point clouds drawn on the fly, and those that are Gaussian mixtures described in closed form (the data,
the oracle, the metrics and the editing posterior all read that one description)."""

from __future__ import annotations

import math

import torch

from diffcli import DiffcliError

# Draws come from the generator's own device and are then moved, so a CPU generator works
# with a CUDA device too (torch refuses a generator on another device).


def draw_uniform(shape, generator, device):
    """Uniform [0, 1) draws from `generator`, placed on `device`."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn(shape, generator, device):
    """Standard normal draws from `generator`, placed on `device`."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def draw_integers(high, n, generator, device):
    """Uniform integers in [0, high) from `generator`, placed on `device`."""
    return torch.randint(high, (n,), generator=generator, device=generator.device).to(device)


def moons(n, *, generator, device, noise=0.05, scale=2.0):
    """Two interleaving half circles (sklearn's make_moons), centred, then scaled."""
    theta = math.pi * draw_uniform(n, generator, device)
    # make_moons' outer moon is (cos, sin), its inner one (1 - cos, 0.5 - sin); shifted by the
    # centre (0.5, 0.25) of their union, the inner moon is exactly the outer one mirrored: -outer
    outer = torch.stack([torch.cos(theta) - 0.5, torch.sin(theta) - 0.25], 1)
    sign = 2 * draw_integers(2, n, generator, device)[:, None].float() - 1
    return scale * (sign * outer + noise * _randn((n, 2), generator, device))


def swissroll(n, *, generator, device, noise=0.03, scale=3.0):
    """2D Swiss roll t (cos t, sin t), t in [1.5 pi, 4.5 pi], normalised to the unit disc, then scaled."""
    t = 1.5 * math.pi * (1 + 2 * draw_uniform(n, generator, device))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / (4.5 * math.pi)
    return scale * (x + noise * _randn((n, 2), generator, device))


def eight_gaussians_modes(radius=2.0, std=0.1):
    """Centres radius (cos, sin)(2 pi k / 8) and the per-mode std of `eight_gaussians`."""
    angle = 2 * math.pi * torch.arange(8, dtype=torch.float32) / 8
    return radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1), float(std)


def eight_gaussians(n, *, generator, device, radius=2.0, std=0.1, return_labels=False):
    """Equal mixture of 8 isotropic Gaussians on a circle of the given radius (with return_labels: and the
    component k of each point, its class)."""
    # centres computed on the device from k (same formula as eight_gaussians_modes): no host copy
    k = draw_integers(8, n, generator, device)
    angle = (2 * math.pi / 8) * k.float()
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    x = centres + std * _randn((n, 2), generator, device)
    return (x, k) if return_labels else x


# the `gmm` toy's default mixture (configs/data/gmm.yaml): three components, distinct full covariances
GMM_MEANS = ((-1.2, -0.5), (1.8, -0.5), (0.3, 2.0))
GMM_COVS = (((0.30, 0.15), (0.15, 0.20)), ((0.10, -0.06), (-0.06, 0.25)), ((0.40, 0.10), (0.10, 0.08)))


def gmm_mixture(means=GMM_MEANS, covs=GMM_COVS, weights=None):
    """The `gmm` toy's components as float64 (means (K, 2), covs (K, 2, 2), weights (K,) summing to 1)."""
    means, covs = torch.as_tensor(means, dtype=torch.float64), torch.as_tensor(covs, dtype=torch.float64)
    k = len(means)
    weights = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if means.shape != (k, 2) or covs.shape != (k, 2, 2) or weights.shape != (k,) or (weights < 0).any():
        raise DiffcliError(f"gmm needs means (K, 2), covs (K, 2, 2) and K non-negative weights; got shapes "
                           f"{tuple(means.shape)}, {tuple(covs.shape)}, {tuple(weights.shape)}; fix data.params")
    if not torch.equal(covs, covs.mT) or torch.linalg.eigvalsh(covs).min() <= 0:
        raise DiffcliError("gmm covs must be symmetric positive definite 2x2 matrices; fix data.params.covs")
    return means, covs, weights / weights.sum()


def gmm(n, *, generator, device, means=GMM_MEANS, covs=GMM_COVS, weights=None, return_labels=False):
    """Mixture of Gaussians N(means[k], covs[k]) (2x2 covariances) picked with probability weights[k] (with
    return_labels: and each point's component k, its class)."""
    means, covs, weights = (x.to(device) for x in gmm_mixture(means, covs, weights))
    k = torch.searchsorted(weights.cumsum(0), draw_uniform(n, generator, device).double()).clamp(max=len(means) - 1)
    z = _randn((n, 2, 1), generator, device).double()
    x = (means[k] + (torch.linalg.cholesky(covs)[k] @ z)[..., 0]).float()
    return (x, k) if return_labels else x


def checkerboard(n, *, generator, device, scale=2.0):
    """Uniform on the black squares ((col + row) even) of a 4x4 board spanning [-scale, scale]^2."""
    col = draw_integers(4, n, generator, device)
    # an even row offset plus the column's parity keeps col + row even
    row = 2 * draw_integers(2, n, generator, device) + col % 2
    corner = torch.stack([col, row], 1).float()
    return (corner + draw_uniform((n, 2), generator, device) - 2) * (scale / 2)


def rings(n, *, generator, device, n_rings=4, noise=0.05, scale=2.5):
    """Concentric circles of radii k / n_rings (k = 1..n_rings, equally likely), then scaled."""
    radius = (draw_integers(n_rings, n, generator, device) + 1).float() / n_rings
    theta = 2 * math.pi * draw_uniform(n, generator, device)
    x = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    return scale * (x + noise * _randn((n, 2), generator, device))


TOYS = {
    "moons": moons,
    "swissroll": swissroll,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "rings": rings,
    "gmm": gmm,
}

def eight_gaussians_mixture(radius=2.0, std=0.1):
    """The `eight_gaussians` toy's components as float64 (means (8, 2), covs std^2 I, equal weights)."""
    means, std = eight_gaussians_modes(radius, std)
    return means.double(), std**2 * torch.eye(2, dtype=torch.float64).expand(8, 2, 2), torch.full((8,), 1 / 8)


# The toys that are Gaussian mixtures, the one description of them (data, oracle, metrics):
# name -> fn(**data.params) -> (means (K, d), covs (K, d, d), weights (K,)), float64
MIXTURES = {"eight_gaussians": eight_gaussians_mixture, "gmm": gmm_mixture}


def mixture_modes(name: str, params: dict):
    """(modes (K, 2) float32, a representative std: the largest principal std among the components) of a mixture."""
    means, covs, _ = MIXTURES[name](**params)
    return means.float(), torch.linalg.eigvalsh(covs).max().sqrt().item()


def mixture_distribution(data_cfg):
    """A Gaussian-mixture toy as torch.distributions (MixtureSameFamily, float64), or None for other data."""
    from omegaconf import OmegaConf

    if data_cfg.get("kind") != "toy" or data_cfg.name not in MIXTURES:
        return None
    params = data_cfg.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params else {}  # an empty node is falsy
    means, covs, weights = MIXTURES[data_cfg.name](**params)
    D = torch.distributions
    return D.MixtureSameFamily(D.Categorical(weights.double()), D.MultivariateNormal(means.double(), covs.double()))
