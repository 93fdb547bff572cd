"""Time grids and samplers against independent truths: EDM's eq. 5, the exact probability-flow ODE of
Gaussian data (checked against scipy), convergence orders, and sample statistics."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffcli import DiffcliError
from diffcli.paths import DDPMPath, FlowPath, NCSNPath, VEPath, VPPath
from diffcli.guidance import CountNFE
from diffcli.prediction import Denoiser
from diffcli.samplers import (GRIDS, NEEDS, SAMPLERS, check_sampler, dopri5, karras_grid, logsnr_grid,
                              t_from_lambda)

F64 = torch.float64
ONE = torch.tensor(1.0, dtype=F64)
M, S0 = torch.tensor([1.0, -0.5], dtype=F64), 0.5  # one Gaussian N(m, s0^2 I)
MIXTURE = torch.tensor([[1.0, -0.5], [-1.0, 0.5]], dtype=F64), 0.5  # two Gaussians, equal weights


class GaussianMixtureVelocity(torch.nn.Module):
    """The exact velocity E[alpha' x0 + sigma' x1 | x_t] for x0 ~ an equal mixture of N(m_k, s0^2 I), Gaussian x1:
    per component E[x0 | x_t] = m + a s0^2 (x_t - a m) / (a^2 s0^2 + s^2), E[x1 | x_t] = s (x_t - a m) / (...)."""

    def __init__(self, path, means=M[None], s0=S0):
        super().__init__()
        self.path, self.means, self.s0 = path, means, s0

    def forward(self, x, t):
        a, s = self.path.alpha(t)[:, None, None], self.path.sigma(t)[:, None, None]
        var = a**2 * self.s0**2 + s**2
        r = (x[:, None] - a * self.means) / var  # (B, K, d)
        w = torch.softmax(-(r**2 * var).sum(-1, keepdim=True) / 2, dim=1)  # responsibilities (equal variances)
        x0, x1 = (w * (self.means + a * self.s0**2 * r)).sum(1), (w * s * r).sum(1)
        return self.path.d_alpha(t)[:, None] * x0 + self.path.d_sigma(t)[:, None] * x1


def denoiser(path, mixture=False):
    net = GaussianMixtureVelocity(path, *MIXTURE) if mixture else GaussianMixtureVelocity(path)
    return CountNFE(Denoiser(net, path, "velocity"))


def x_prior(path, n=64, seed=0):
    x1 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x1 * path.sigma(ONE)


def closed_form(path, x_1, t):
    """The probability-flow map for one Gaussian: x_t = a_t m + sqrt(a_t^2 s0^2 + s_t^2) z, z constant."""
    t = torch.tensor(t, dtype=F64)
    z = (x_1 - path.alpha(ONE) * M) / torch.sqrt(path.alpha(ONE) ** 2 * S0**2 + path.sigma(ONE) ** 2)
    return path.alpha(t) * M + torch.sqrt(path.alpha(t) ** 2 * S0**2 + path.sigma(t) ** 2) * z


def scipy_solution(path, den, x_1, t_end):
    """An independent reference: scipy's DOP853 on the same velocity at tight tolerances."""
    def v(t, y):
        x = torch.from_numpy(y).reshape(x_1.shape)
        return den.net(x, torch.full((len(x),), t, dtype=F64)).reshape(-1).numpy()
    sol = solve_ivp(v, (1.0, t_end), x_1.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    return torch.from_numpy(sol.y[:, -1]).reshape(x_1.shape)


PATHS = {"vp": VPPath(), "ve": VEPath(sigma_max=10.0), "flow": FlowPath(), "ddpm": DDPMPath(T=1000),
         "ncsn": NCSNPath(L=10)}


# ---------------------------------------------------------------------------------------------- grids

@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("grid", ["uniform", "quadratic", "karras", "logsnr", "ddim"])
def test_grids_run_from_one_to_zero(path_name, grid):
    t = GRIDS[grid](PATHS[path_name], 12)
    assert t.dtype == F64 and len(t) == 13 and t[-1] == 0 and (t.diff() < 0).all()
    assert t[0] == 1 or (grid == "ddim" and 0.9 < t[0] < 1)  # DDIM's leading spacing stops short of T


def test_ends_and_levels_grids():
    assert GRIDS["ends"](PATHS["vp"], 7, t_min=1e-2).tolist() == [1.0, 1e-2, 0.0]
    levels = GRIDS["levels"](PATHS["ncsn"], None)
    assert len(levels) == 10 and levels[0] == 1 and levels[-1] == 0 and (levels.diff() < 0).all()


def test_quadratic_grid_formula():
    t = GRIDS["quadratic"](PATHS["vp"], 5, t_min=0.01)
    torch.testing.assert_close(t[:-1], 0.01 + 0.99 * torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=F64) ** 2)


def scaled_sigma(path, t):
    return path.sigma(t) / path.alpha(t)


@pytest.mark.parametrize("path_name", ["vp", "ve", "ddpm"])
def test_karras_grid_follows_edm_eq5(path_name):
    path, n, rho, t_min = PATHS[path_name], 18, 7.0, 1e-3
    t = karras_grid(path, n, t_min=t_min, rho=rho)
    top = scaled_sigma(path, ONE).clamp(max=80.0)  # EDM's sigma_max caps the top (VP's is 150)
    hi, lo = top ** (1 / rho), scaled_sigma(path, torch.tensor(t_min, dtype=F64)) ** (1 / rho)
    expected = (hi + torch.arange(n, dtype=F64) / (n - 1) * (lo - hi)) ** rho
    assert t[0] == 1  # sampling always starts at the prior
    torch.testing.assert_close(scaled_sigma(path, t[1:-1]), expected[1:], rtol=1e-9, atol=0)


def test_karras_grid_on_a_flow_starts_at_one():
    """alpha(1) = 0 makes sigma/alpha infinite at t = 1: the range starts at EDM's sigma_max = 80 (not at
    1e4, where rho = 7 would spend most steps near t = 1), and the first point is t = 1."""
    path, n = PATHS["flow"], 10
    t = karras_grid(path, n)
    hi, lo = torch.tensor(80.0, dtype=F64) ** (1 / 7), scaled_sigma(path, torch.tensor(1e-3, dtype=F64)) ** (1 / 7)
    expected = (hi + torch.arange(n, dtype=F64) / (n - 1) * (lo - hi)) ** 7
    assert t[0] == 1
    torch.testing.assert_close(scaled_sigma(path, t[1:-1]), expected[1:], rtol=1e-9, atol=0)


@pytest.mark.parametrize("path_name", ["vp", "ve", "flow", "ddpm"])
def test_logsnr_grid_is_uniform_in_lambda(path_name):
    path = PATHS[path_name]
    t = logsnr_grid(path, 20)
    lam = torch.log(path.alpha(t[1:-1]) / path.sigma(t[1:-1]))  # t[0] = 1 is -inf on a flow
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(len(lam) - 1), rtol=1e-9, atol=1e-12)


def closed_form_lambda(path_name, t):
    """lambda = log(alpha/sigma) written from each path's closed form: VP -log(e^B - 1)/2, B = int_0^t beta;
    VE -log sigma_min - t log(sigma_max/sigma_min); flow log((1 - t)/t)."""
    if path_name == "vp":
        return -0.5 * torch.log(torch.expm1(0.1 * t + (20.0 - 0.1) * t**2 / 2))
    if path_name == "ve":
        return -math.log(0.01) - t * math.log(10.0 / 0.01)
    return torch.log((1 - t) / t)


@pytest.mark.parametrize("path_name, t", [("vp", [0.01, 0.5, 1.0, 1.1, 1.6]), ("ve", [0.01, 0.5, 1.0, 1.3]),
                                          ("flow", [0.01, 0.5, 0.9999])])
def test_t_from_lambda_inverts_lambda_beyond_the_prior(path_name, t):
    """Churn's first step needs t_hat > 1 where VP and VE extend; a flow's lambda covers everything below t = 1."""
    t = torch.tensor(t, dtype=F64)
    torch.testing.assert_close(t_from_lambda(PATHS[path_name], closed_form_lambda(path_name, t)), t,
                               rtol=1e-12, atol=1e-12)


def test_ddpm_t_from_lambda_inverts_diffusers_alphas_cumprod():
    """On DDPM's grid, lambda from diffusers' alphas_cumprod (the reference) maps back to t = (i + 1) / T; between
    and beyond the grid points (churn's t > 1) t_from_s inverts the path's own sigma/alpha."""
    from diffusers import DDPMScheduler

    path = PATHS["ddpm"]
    alpha_bar = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    i = torch.tensor([0, 1, 10, 499, 998, 999])
    lam = 0.5 * torch.log(alpha_bar[i] / (1 - alpha_bar[i]))
    # diffusers computes alphas_cumprod in float32: 1e-6 is a thousandth of a step
    torch.testing.assert_close(t_from_lambda(path, lam), (i + 1).double() / 1000, rtol=0, atol=1e-6)
    t = torch.tensor([0.0, 1e-4, 0.0125, 0.5, 0.9995, 1.0, 1.2], dtype=F64)
    torch.testing.assert_close(path.t_from_s(path.sigma(t) / path.alpha(t)), t, rtol=1e-10, atol=1e-12)


def test_unknown_sampler_options_refuse_in_one_line():
    path = PATHS["vp"]
    for sampler, options, fragment in [("unipc", {"order": 4}, "order=4"), ("dpmpp_2m_sde", {"eta": -1.0}, "eta=-1"),
                                       ("dpmpp_2m_sde", {"solver_type": "rk"}, "solver_type=rk"),
                                       ("pc", {"predictor": "ode"}, "predictor=ode")]:
        with pytest.raises(DiffcliError, match=fragment):
            SAMPLERS[sampler](denoiser(path), path, x_prior(path), GRIDS["uniform"](path, 25), **options)


# ------------------------------------------------------------------------------------- ODE accuracy

@pytest.mark.parametrize("path_name, t_end", [("vp", 1e-2), ("flow", 0.0)])
def test_closed_form_solves_the_probability_flow_ode(path_name, t_end):
    path = PATHS[path_name]
    x = x_prior(path, n=8)
    torch.testing.assert_close(scipy_solution(path, denoiser(path), x, t_end), closed_form(path, x, t_end),
                               rtol=1e-8, atol=1e-8)


def errors(path, sampler, grid, steps, t_end, mixture):
    """Max error at t_end after `steps` and 2 `steps` steps."""
    den, x = denoiser(path, mixture), x_prior(path)
    truth = scipy_solution(path, den, x, t_end) if mixture else closed_form(path, x, t_end)
    out = []
    for n in (steps, 2 * steps):
        if grid == "uniform":
            t = torch.linspace(1, t_end, n + 1, dtype=F64)
        else:  # the grid's n + 1 points down to t_end (to t_min = 1e-3, then 0, on a flow)
            t = GRIDS[grid](path, n + 1, t_min=t_end)[:-1] if t_end > 0 else GRIDS[grid](path, n)
        out.append((SAMPLERS[sampler](den, path, x, t) - truth).abs().max().item())
    return out


ORDER_BANDS = {1: (0.8, 1.3), 2: (1.6, 2.6), 3: (2.5, 3.9), 4: (3.3, 4.8)}
# One Gaussian on VP, ending at t_min = 1e-2 (sigma = 0 at t = 0); on a flow to t = 0, the two-Gaussian mixture:
# for one Gaussian a flow's ODE is special (midpoint converges at order 3 there).
CONVERGENCE = [  # (path, sampler, grid, N, order): errors at N and 2N steps
    ("vp", "euler", "uniform", 80, 1), ("vp", "heun", "uniform", 40, 2), ("vp", "heun", "karras", 40, 2),
    ("vp", "dpmpp_2m", "logsnr", 40, 2), ("flow", "euler", "uniform", 20, 1), ("flow", "heun", "uniform", 20, 2),
    ("flow", "heun", "karras", 40, 2), ("flow", "dpmpp_2m", "logsnr", 40, 2), ("flow", "midpoint", "uniform", 20, 2),
    ("flow", "rk4", "uniform", 10, 4),
    # UniPC with order 2: its corrector UniC-2 raises the order to 3 (Zhao et al. 2023)
    ("vp", "unipc", "logsnr", 40, 3), ("flow", "unipc", "logsnr", 40, 3)]


@pytest.mark.parametrize("path_name, sampler, grid, steps, order", CONVERGENCE)
def test_convergence_order(path_name, sampler, grid, steps, order):
    flow = path_name == "flow"
    coarse, fine = errors(PATHS[path_name], sampler, grid, steps, 0.0 if flow else 1e-2, mixture=flow)
    lo, hi = ORDER_BANDS[order]
    assert lo <= math.log2(coarse / fine) <= hi, (coarse, fine, math.log2(coarse / fine))


@pytest.mark.parametrize("path_name", ["vp", "flow"])
def test_dopri5_matches_the_closed_form(path_name):
    path = PATHS[path_name]
    den, x, trajectory = denoiser(path), x_prior(path), []
    out = dopri5(den, path, x, GRIDS["ends"](path, 1, t_min=1e-2), rtol=1e-7, atol=1e-7, trajectory=trajectory)
    torch.testing.assert_close(trajectory[1], closed_form(path, x, 1e-2), rtol=0, atol=1e-5)
    # then the denoising step at t_min (flows too: a uniform prior's field sharpens as t -> 0)
    torch.testing.assert_close(out, den(trajectory[1], torch.tensor(1e-2, dtype=F64)))
    assert 20 < den.nfe < 500


# ------------------------------------------------------------------------------ sample statistics

@pytest.mark.parametrize("sampler, options, steps", [("euler_maruyama", {}, 400),
                                                     ("pc", {"predictor": "reverse_diffusion"}, 200),
                                                     ("pc", {"predictor": "euler_maruyama"}, 200),
                                                     ("pc", {"predictor": "gaussian_transition"}, 200),
                                                     ("heun", {"s_churn": 10.0, "s_tmax": 50.0}, 40)])
def test_stochastic_samplers_reach_the_data_distribution(sampler, options, steps):
    path = PATHS["vp"]
    x = x_prior(path, n=20_000, seed=1)
    grid = GRIDS["karras" if sampler == "heun" else "uniform"](path, steps)
    out = SAMPLERS[sampler](denoiser(path), path, x, grid, generator=torch.Generator().manual_seed(2), **options)
    torch.testing.assert_close(out.mean(0), M, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(out.T), S0**2 * torch.eye(2, dtype=F64), rtol=0, atol=0.02)


# ----------------------------------------------------------------------------------- requirements

@pytest.mark.parametrize("sampler, path, options, fragment", [
    ("rk4", VPPath(), {}, "sampler=rk4 integrates a flow's velocity up to t = 0; for diffusion models use heun, "
                          "dpmpp_2m or dopri5"),
    ("midpoint", DDPMPath(), {}, "for diffusion models use"),
    ("pc", FlowPath(prior="uniform"), {}, "Gaussian prior"),
    ("euler_maruyama", FlowPath(), {}, "alpha(1) = 0"),  # the reverse SDE's drift is infinite at a flow's t = 1
    ("heun", FlowPath(prior="uniform"), {"s_churn": 1.0}, "s_churn=0"),
    ("ddim", FlowPath(prior="uniform"), {"eta": 1.0}, "eta=0"),
    ("euler", FlowPath(prior="uniform"), {"s_churn": 1.0}, "s_churn=0"),
    ("dpmpp_2m_sde", FlowPath(prior="uniform"), {"eta": 1.0}, "eta=0"),
    ("dpmpp_3m_sde", FlowPath(prior="uniform"), {"eta": 0.5}, "eta=0"),
])
def test_invalid_pairs_refuse_in_one_line(sampler, path, options, fragment):
    with pytest.raises(DiffcliError) as e:
        SAMPLERS[sampler](denoiser(path), path, x_prior(path), GRIDS["uniform"](path, 3), **options)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DiffcliError):
        check_sampler(sampler, path, **options)


def test_needs_covers_every_sampler_and_valid_pairs_pass():
    assert set(NEEDS) == set(SAMPLERS)
    uniform_flow = FlowPath(prior="uniform")
    for name in ["euler", "heun", "dpmpp_2m", "unipc", "midpoint", "rk4", "dopri5", "ddim"]:
        check_sampler(name, uniform_flow)
    for name in ["dpmpp_2m_sde", "dpmpp_3m_sde"]:
        check_sampler(name, uniform_flow, eta=0.0)
    with pytest.raises(DiffcliError, match="unknown"):
        check_sampler("rk45", uniform_flow)


# ------------------------------------------------------------------------------------- trajectory

VALID_PATH = {"midpoint": "flow", "rk4": "flow", "langevin": "ncsn"}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_trajectory_records_every_step(sampler):
    path = PATHS[VALID_PATH.get(sampler, "vp")]
    options = {"n_steps": 2} if sampler == "langevin" else {}
    # pc on VP takes score_sde's discrete betas beta(t)/N, at most 1 only for N >= beta_max = 20
    grid = {"langevin": GRIDS["levels"](path), "dopri5": GRIDS["ends"](path),
            "pc": GRIDS["uniform"](path, 20)}.get(sampler, GRIDS["uniform"](path, 6))
    trajectory = []
    out = SAMPLERS[sampler](denoiser(path), path, x_prior(path, n=4), grid, generator=torch.Generator().manual_seed(0),
                            trajectory=trajectory, **options)
    steps = len(grid) + 1 if sampler == "langevin" else len(grid) - 1  # langevin: each level and the denoising
    assert len(trajectory) == steps + 1 and torch.equal(trajectory[-1], out)
    assert all(x.shape == out.shape and np.isfinite(x.numpy()).all() for x in trajectory)


def test_langevin_levels_off_ncsn_are_geometric_in_the_noise_level():
    """On a VP path: 10 levels with sigma/alpha log-uniform from its value at t = 1 down to 0.01,
    where sigma/alpha = sqrt(exp(B(t)) - 1), B(t) = int_0^t beta, is written from the VP closed form."""
    from diffcli.paths import VPPath
    from diffcli.samplers import levels_grid

    path = VPPath(beta_min=0.1, beta_max=20.0)
    t = levels_grid(path, 10, sigma_min=0.01)
    scaled = torch.sqrt(torch.expm1(0.1 * t + (20.0 - 0.1) * t**2 / 2))
    top = math.sqrt(math.expm1(0.1 + (20.0 - 0.1) / 2))
    expected = torch.exp(torch.linspace(math.log(top), math.log(0.01), 10, dtype=F64))
    assert len(t) == 10 and t[0] == 1 and (t.diff() < 0).all()
    torch.testing.assert_close(scaled, expected, rtol=1e-8, atol=0)
