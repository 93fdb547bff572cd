"""Sample-quality statistics on point sets and feature sets: Fréchet distance, KID, MMD, energy distance.

Fréchet distance and KID are torch-fidelity's own functions (a port of the reference TTUR / MMD-GAN
code), so Inception-FID, classifier-FID and the 2D numbers share one implementation.
"""

from __future__ import annotations

import math

import torch


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) of Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6)."""
    return frechet_from_statistics(feature_statistics(f1), feature_statistics(f2))


def frechet_from_statistics(s1: dict, s2: dict) -> float:
    """The Fréchet distance of two {"mu", "sigma"} statistics (numpy float64)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID]


def feature_statistics(f: torch.Tensor, chunk: int = 4096) -> dict:
    """{"mu", "sigma"}: mean and unbiased covariance of (N, d) features, as numpy float64 (np.cov's, as
    torch-fidelity's fid_features_to_statistics computes them), summed in float64 over chunks of rows, so that
    50,000 float32 Inception features never exist as one float64 copy."""
    f = f.detach().cpu()
    mu = sum(c.double().sum(0) for c in f.split(chunk)) / len(f)
    sigma = sum((c.double() - mu).T @ (c.double() - mu) for c in f.split(chunk)) / (len(f) - 1)
    return {"mu": mu.numpy(), "sigma": sigma.numpy()}


def kid(f1: torch.Tensor, f2: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with the cubic kernel
    (x.y / d + 1)^3, averaged over random subsets; subset_size is capped by the smaller set."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(f1), len(f2))
    out = kid_features_to_metric(f1.detach().double().cpu(), f2.detach().double().cpu(), kid_subsets=subsets,
                                 kid_subset_size=size, kid_kernel="poly", kid_kernel_poly_degree=3,
                                 kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=seed, verbose=False)
    return {"kid": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD], "kid_subset_size": size}


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with a sum of RBF kernels exp(-|a-b|^2 / (2 h^2))."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    m, n = len(x), len(y)

    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * h**2)) for h in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return (xx + yy - 2 * kxy.mean()).item()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Székely & Rizzo 2013), unbiased within-set means."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    m, n = len(x), len(y)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (m * (m - 1))
    yy = torch.cdist(y, y).sum() / (n * (n - 1))
    return (2 * xy - xx - yy).item()


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size point sets (Rabin et al. 2011)."""
    if len(x) != len(y):
        raise ValueError("sliced_wasserstein needs sets of equal size")
    theta = torch.randn(x.shape[1], n_proj, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    px, py = (x.double() @ theta).sort(dim=0).values, (y.double() @ theta).sort(dim=0).values
    return math.sqrt((px - py).square().mean().item())


def class_balance(probs: torch.Tensor) -> dict:
    """Mean top-class confidence and how evenly the predicted classes are filled (normalised entropy, 1 = even)."""
    counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double()
    share = counts / counts.sum()
    entropy = -(share[share > 0] * share[share > 0].log()).sum().item()
    return {"confidence": probs.max(1).values.mean().item(), "class_entropy": entropy / math.log(probs.shape[1]),
            "class_counts": counts.long().tolist()}

