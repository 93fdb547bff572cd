"""Prediction conversions: every pair round-trips in float64 and agrees with the definitions."""

import itertools

import pytest
import torch

from diffcli import DiffcliError
from diffcli.paths import DDPMPath
from diffcli.guidance import CountNFE
from diffcli.prediction import COEFFICIENTS, Denoiser, convert, target, to_x0_x1

PATH = DDPMPath(T=1000, schedule="cosine")
g = torch.Generator().manual_seed(0)
X0 = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
X1 = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
T_ = torch.rand(16, generator=g, dtype=torch.float64) * 0.98 + 0.01
X_T = PATH.marginal(X0, X1, T_)


def b(c):
    return c.reshape(-1, 1, 1, 1)


def test_targets_are_the_textbook_definitions():
    a, s, da, ds = (b(f(T_)) for f in (PATH.alpha, PATH.sigma, PATH.d_alpha, PATH.d_sigma))
    expected = {"x0": X0, "eps": X1, "score": -X1 / s, "v": a * X1 - s * X0, "velocity": da * X0 + ds * X1}
    for name, value in expected.items():
        torch.testing.assert_close(target(name, PATH, X0, X1, T_), value)
    # the velocity is d x_t / dt along the path, by finite differences
    h = 1e-6
    fd = (PATH.marginal(X0, X1, T_ + h) - PATH.marginal(X0, X1, T_ - h)) / (2 * h)
    torch.testing.assert_close(target("velocity", PATH, X0, X1, T_), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source, dest", list(itertools.permutations(COEFFICIENTS, 2)))
def test_every_pair_round_trips_in_float64(source, dest):
    pred = target(source, PATH, X0, X1, T_)
    there = convert(pred, source, dest, PATH, X_T, T_)
    torch.testing.assert_close(there, target(dest, PATH, X0, X1, T_), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(convert(there, dest, source, PATH, X_T, T_), pred, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", list(COEFFICIENTS))
def test_solve_recovers_x0_and_x1(prediction):
    x0, x1 = to_x0_x1(target(prediction, PATH, X0, X1, T_), prediction, PATH, X_T, T_)
    torch.testing.assert_close(x0, X0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x1, X1, rtol=1e-9, atol=1e-9)


def test_denoiser_counts_evaluations_and_broadcasts_scalar_time():
    class Perfect(torch.nn.Module):
        def forward(self, x, t):
            return target("v", PATH, X0, X1, t)

    d = CountNFE(Denoiser(Perfect(), PATH, "v"))
    torch.testing.assert_close(d(X_T, T_), X0)
    d(PATH.marginal(X0, X1, T_[3]), T_[3])
    assert d.nfe == 2


def test_unknown_prediction():
    with pytest.raises(DiffcliError, match="eps, x0, score, v, velocity|choose one of"):
        Denoiser(torch.nn.Identity(), PATH, "noise")
