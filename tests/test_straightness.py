"""Straightness (Liu et al. 2023) against its closed form on one Gaussian, where the flow's trajectories are known:
for data N(mu, S) on the flow path x_t = (1 - t) x0 + t x1 the probability-flow map is x_t = (1 - t) mu +
A_t x1, A_t = ((1 - t)^2 S + t^2 I)^(1/2); in S's eigenbasis (eigenvalues l_i, coordinates z_i of x1) each
trajectory's S = sum_i c_i z_i^2 with c_i = int_0^1 (1 - sqrt(l_i) - a_i'(t))^2 dt, a_i = sqrt((1 - t)^2 l_i + t^2)."""

import pytest
import torch
from scipy.integrate import quad

from diffcli import DiffcliError
from diffcli.likelihood import straightness
from test_editing import gaussian_flow


def closed_form(x1: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """sum_i c_i z_i^2 per row of x1 (quad for each c_i: an independent quadrature of the formula above)."""
    lam, Q = torch.linalg.eigh(S)
    c = []
    for l in lam.tolist():
        da = lambda t, l=l: (t - (1 - t) * l) / ((1 - t) ** 2 * l + t**2) ** 0.5  # noqa: E731
        c.append(quad(lambda t: (1 - l**0.5 - da(t)) ** 2, 0, 1)[0])
    z = x1.double() @ Q
    return (z**2 * torch.tensor(c, dtype=torch.float64)).sum(1)


@pytest.mark.parametrize("steps,tolerance", [(100, 0.045), (1000, 0.0045)])
def test_straightness_of_a_gaussian_flow_equals_its_closed_form(steps, tolerance):
    """Per trajectory, Euler's estimate equals the closed form within its O(1/steps) error (measured: largest
    relative error 3.2% at 100 steps, 0.32% at 1000: first order, as Euler)."""
    denoiser, _, _, S = gaussian_flow()
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    estimate, truth = straightness(denoiser, x1, steps), closed_form(x1, S)
    assert ((estimate - truth).abs() / truth).max() < tolerance
    assert truth.mean() > 0.05  # these paths are curved: the check is not of zeros


def test_bad_steps_are_one_line():
    denoiser, *_ = gaussian_flow()
    with pytest.raises(DiffcliError, match="steps=0 must be a positive integer"):
        straightness(denoiser, torch.zeros(2, 2, dtype=torch.float64), 0)
