"""The DDPM path: derivatives against autograd, SDE coefficients against VP closed forms, marginals."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffcli import DiffcliError
from diffcli.paths import DDPMPath



def off_grid_times(T, n=200):
    """Times strictly inside grid segments (the interpolated path is smooth there)."""
    k = torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(0))
    w = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    return ((k + w) / T).double()


DIFFUSERS_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear",
                   "sigmoid": "sigmoid"}  # model.path.schedule -> diffusers' beta_schedule


@pytest.mark.parametrize("schedule", list(DIFFUSERS_NAMES))
def test_derivatives_match_autograd(schedule):
    path = DDPMPath(T=100, schedule=schedule)
    t = off_grid_times(path.T).requires_grad_(True)
    for fn, d_fn in [(path.alpha, path.d_alpha), (path.sigma, path.d_sigma)]:
        (grad,) = torch.autograd.grad(fn(t).sum(), t)
        torch.testing.assert_close(d_fn(t.detach()), grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", list(DIFFUSERS_NAMES))
def test_sde_coefficients_are_the_vp_closed_forms(schedule):
    """VP: g(t)^2 = beta(t) and f(t) = -beta(t)/2, with beta(t) = -d log alpha_bar / dt = -T log(1 - beta_i)."""
    T = 100
    path = DDPMPath(T=T, schedule=schedule)
    betas = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAMES[schedule]).betas.double()
    t = off_grid_times(T)
    beta_t = -T * torch.log1p(-betas[(t * T).floor().long()])
    # diffusers stores betas in float32: near the cosine schedule's clip at 0.999, log(1 - beta)
    # carries ~1e-6 relative error
    torch.testing.assert_close(path.g2(t), beta_t, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(path.f(t), -beta_t / 2, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t))


def test_endpoints():
    path = DDPMPath(T=1000)
    assert path.alpha(torch.tensor(0.0)) == 1 and path.sigma(torch.tensor(0.0)) == 0
    one = torch.tensor(1.0, dtype=torch.float64)  # in float32 alpha carries ~1e-7 relative rounding
    assert path.alpha(one) ** 2 == pytest.approx(torch.prod(1 - path.betas).item(), rel=1e-9)


def test_marginal_by_sampling():
    """x_t = alpha x0 + sigma x1 with x0 ~ N(m, s^2): mean alpha m, variance alpha^2 s^2 + sigma^2."""
    path = DDPMPath(T=1000)
    g = torch.Generator().manual_seed(0)
    n, m, s = 200_000, 1.5, 0.5
    for t_val in [0.05, 0.3, 0.7]:
        t = torch.full((n,), t_val)
        x0 = m + s * torch.randn(n, 1, generator=g)
        x_t = path.marginal(x0, path.sample_prior(x0.shape, g, "cpu"), t)
        a, sig = path.alpha(torch.tensor(t_val)).item(), path.sigma(torch.tensor(t_val)).item()
        assert x_t.mean().item() == pytest.approx(a * m, abs=4 * (a**2 * s**2 + sig**2) ** 0.5 / n**0.5)
        assert x_t.var().item() == pytest.approx(a**2 * s**2 + sig**2, rel=0.02)


def test_training_times_are_the_grid():
    path = DDPMPath(T=10)
    t = path.sample_t(10_000, torch.Generator().manual_seed(0), "cpu")
    assert set((t * 10).round().long().tolist()) == set(range(1, 11))


@pytest.mark.parametrize("kwargs, match", [({"T": 1}, "T"), ({"schedule": "quadratic"}, "schedule"),
                                           ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start")])
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(DiffcliError, match=match) as e:
        DDPMPath(**kwargs)
    assert "\n" not in str(e.value)
