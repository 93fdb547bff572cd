"""Fréchet distance, KID, MMD and energy distance against closed forms and direct computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from diffcli.data import to_uint8
from diffcli.metrics import (class_balance, energy_distance, feature_statistics, frechet_distance,
                             frechet_from_statistics, kid, mmd_rbf)


def _random_spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)).numpy()


def _frechet_scipy(mu1, s1, mu2, s2):
    """The symmetric form |dmu|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), with scipy's sqrtm."""
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def test_frechet_of_exact_gaussians_matches_scipy_sqrtm():
    g = torch.Generator().manual_seed(0)
    d = 6
    mu1, mu2 = (torch.randn(d, generator=g, dtype=torch.float64).numpy() for _ in range(2))
    s1, s2 = _random_spd(d, g), _random_spd(d, g)
    ours = frechet_from_statistics({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2})
    assert ours == pytest.approx(_frechet_scipy(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_of_diagonal_gaussians_is_the_closed_form():
    """Commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    closed = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    ours = frechet_from_statistics({"mu": mu1, "sigma": np.diag(sd1**2)}, {"mu": mu2, "sigma": np.diag(sd2**2)})
    assert ours == pytest.approx(closed, rel=1e-12)


def test_frechet_of_two_gaussian_feature_sets():
    """Samples of N(mu1, S1) and N(mu2, S2): the estimate converges to the closed form; same set gives ~0."""
    g = torch.Generator().manual_seed(1)
    d, n = 4, 200_000
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.tensor([1.0, -0.5, 0.0, 0.25], dtype=torch.float64)
    s1, s2 = _random_spd(d, g), _random_spd(d, g)
    f1 = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.from_numpy(np.linalg.cholesky(s1)).T
    f2 = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.from_numpy(np.linalg.cholesky(s2)).T
    closed = _frechet_scipy(mu1.numpy(), s1, mu2.numpy(), s2)
    assert frechet_distance(f1, f2) == pytest.approx(closed, rel=0.02)
    assert abs(frechet_distance(f1, f1)) < 1e-8


def test_frechet_of_features_agrees_with_scipy_on_the_same_features():
    g = torch.Generator().manual_seed(2)
    f1 = torch.randn(500, 16, generator=g, dtype=torch.float64)
    f2 = 0.8 * torch.randn(500, 16, generator=g, dtype=torch.float64) + 0.3
    s1, s2 = feature_statistics(f1), feature_statistics(f2)
    assert np.allclose(s1["sigma"], np.cov(f1.numpy(), rowvar=False))
    reference = float(((s1["mu"] - s2["mu"]) ** 2).sum() + np.trace(s1["sigma"] + s2["sigma"])
                      - 2 * np.trace(scipy.linalg.sqrtm(s1["sigma"] @ s2["sigma"]).real))
    assert frechet_distance(f1, f2) == pytest.approx(reference, rel=1e-7)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    """One subset holding every point: KID equals the U-statistic computed term by term."""
    g = torch.Generator().manual_seed(3)
    m, d = 25, 5
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    out = kid(x, y, subsets=1, subset_size=m)
    assert out["kid"] == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert out["kid_subset_size"] == m and out["kid_std"] == 0


def test_kid_is_unbiased_near_zero_for_one_distribution():
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(400, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out = kid(x, y, subsets=50, subset_size=200)
    assert abs(out["kid"]) < 4 * out["kid_std"] + 1e-3
    assert kid(x, y + 1.0, subsets=10, subset_size=200)["kid"] > 0.5


def test_mmd_rbf_matches_the_gaussian_closed_form():
    """X ~ N(m1, s1^2 I), Y ~ N(m2, s2^2 I) in d dims: E k(X, Y) = (h^2/c)^(d/2) exp(-|m1-m2|^2 / (2c)), c = h^2+s1^2+s2^2."""
    g = torch.Generator().manual_seed(5)
    d, n, s1, s2 = 2, 4000, 0.5, 0.8
    m1, m2 = torch.zeros(d), torch.tensor([1.0, 0.5])
    x = m1 + s1 * torch.randn(n, d, generator=g)
    y = m2 + s2 * torch.randn(n, d, generator=g)

    def expected_k(sa, sb, dm2, h):
        c = h**2 + sa**2 + sb**2
        return (h**2 / c) ** (d / 2) * math.exp(-dm2 / (2 * c))

    hs = (0.2, 1.0)
    closed = sum(expected_k(s1, s1, 0, h) + expected_k(s2, s2, 0, h) - 2 * expected_k(s1, s2, float((m1 - m2).square().sum()), h)
                 for h in hs)
    # the estimate's spread across seeds at n = 4000 is about 0.008: 3 standard deviations
    assert mmd_rbf(x, y, bandwidths=hs) == pytest.approx(closed, abs=0.025)
    assert abs(mmd_rbf(x, m1 + s1 * torch.randn(n, d, generator=g), bandwidths=hs)) < 0.003


def test_energy_distance_matches_the_gaussian_closed_form():
    """1D N(0,1) vs N(mu,1): 2 E|N(mu, 2)| - 2 E|N(0, 2)|, E|N(mu, v)| = sqrt(2v/pi) e^(-mu^2/2v) + mu (1 - 2 Phi(-mu/sqrt v))."""
    g = torch.Generator().manual_seed(6)
    mu, n = 1.0, 4000
    x, y = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g) + mu
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    abs_mean = lambda m, v: math.sqrt(2 * v / math.pi) * math.exp(-m**2 / (2 * v)) + m * (1 - 2 * phi(-m / math.sqrt(v)))  # noqa: E731
    closed = 2 * abs_mean(mu, 2) - 2 * abs_mean(0, 2)
    assert energy_distance(x, y) == pytest.approx(closed, rel=0.05)


def test_uint8_conversion_and_class_balance():
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]
    probs = torch.eye(4, dtype=torch.float64).repeat(5, 1)  # every class 5 times, full confidence
    out = class_balance(probs)
    assert out["confidence"] == 1 and out["class_entropy"] == pytest.approx(1) and out["class_counts"] == [5] * 4
    assert class_balance(torch.eye(4, dtype=torch.float64)[[0] * 8])["class_entropy"] == 0
