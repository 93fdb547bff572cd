"""euler, heun, dpmpp_2m, dpmpp_2m_sde and dpmpp_3m_sde against k-diffusion's samplers (the reference), in float64
with the exact oracle denoiser, on the same grid and the same noise, for every Gaussian path.

k-diffusion works in EDM's variables: x~ = x/alpha at the noise level s = sigma/alpha, and a model D(x~; s). We
present diffcli's denoiser to it as D(x~; s) = x0_hat(alpha(t) x~, t), with t the grid time whose s it is (an
exact lookup) or, for a churned s_hat off the grid, the bisection inverse t_from_lambda(-log s_hat). The grid's
last point t = 0 is s = 0 for every path. A flow starts at s = inf (alpha(1) = 0), where k-diffusion's formulas
are nan: there k-diffusion starts from diffcli's state after the first step, which is checked on its own.
"""

import math

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config, k_diffusion_sampling
from diffcli.data import build_data
from diffcli.samplers.grids import karras_grid, logsnr_grid, t_from_lambda, uniform_grid
from diffcli.guidance import CountNFE
from diffcli.prediction import Denoiser
from diffcli.samplers import ddim, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, euler, heun

K = k_diffusion_sampling()
F64 = torch.float64
MODELS = ["vpsde", "subvpsde", "vesde", "ddpm", "flow"]
TOL = 1e-6


def oracle(model):
    """The exact denoiser of eight_gaussians on this formulation (net=oracle)."""
    cfg = compose_config("train", ["data=eight_gaussians", "net=oracle", f"model={model}"])
    data = build_data(cfg.data, torch.device("cpu"))
    return CountNFE(Denoiser(instantiate(cfg.net, shape=data.shape), instantiate(cfg.model.path), cfg.model.prediction))


def prior(path, n=64, seed=0):
    """x at t = 1: sigma(1) x1 (+ alpha(1) x0 is negligible and absent on a flow), in float64."""
    return path.sigma(torch.tensor(1.0, dtype=F64)) * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed),
                                                                   dtype=F64)


def edm_sigmas(path, t_grid):
    """k-diffusion's sigmas: s = sigma/alpha at the grid's times, s = 0 at the last point t = 0."""
    s = path.sigma(t_grid) / path.alpha(t_grid)
    s[-1] = 0.0
    return s


def k_model(denoiser, path, t_grid):
    """diffcli's denoiser as k-diffusion's model(x~, s) = x0_hat(alpha(t) x~, t)."""
    sigmas = edm_sigmas(path, t_grid)

    def model(x_tilde, s):
        hit = (sigmas == s[0]).nonzero()
        t = t_grid[hit[0, 0]] if len(hit) else t_from_lambda(path, -torch.log(s[0]))
        return denoiser(path.alpha(t) * x_tilde, t)
    return model


def start(path, x, t_grid, trajectory):
    """Where k-diffusion starts: x~ = x/alpha at the grid's first point, or on a flow (s = inf) after diffcli's
    first step, with the rest of the grid."""
    if path.alpha(t_grid[0]) > 0:
        return x / path.alpha(t_grid[0]), t_grid
    return trajectory[1] / path.alpha(t_grid[1]), t_grid[1:]


def noise_stream(seed, skip):
    """A generator seeded like diffcli's, past the `skip` draws diffcli made on steps k-diffusion does not run."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(skip):
        torch.randn(64, 2, generator=g, dtype=F64)
    return g


def report(name, ours, reference):
    error = (ours - reference).abs().max().item()
    print(f"{name}: max |diffcli - k-diffusion| = {error:.2e}")
    assert error < TOL, error


# ------------------------------------------------------------------------------- euler and heun

CHURN = {"none": {}, "churn": {"s_churn": 2.0},
         "window": {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 20.0, "s_noise": 1.003}}


@pytest.mark.parametrize("churn", list(CHURN))
@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("model", MODELS)
def test_euler_and_heun_match_k_diffusion(model, sampler, churn, monkeypatch):
    """Churn (where s_tmin <= s <= s_tmax, the first step too: there t_hat > 1) draws noise on every step, as
    k-diffusion draws torch.randn_like on every step; k-diffusion's draws come from a generator seeded alike."""
    options, (ours_fn, reference_fn) = CHURN[churn], {"euler": (euler, K.sample_euler),
                                                      "heun": (heun, K.sample_heun)}[sampler]
    denoiser = oracle(model)
    path, n = denoiser.path, 8
    t_grid = (karras_grid if sampler == "heun" else uniform_grid)(path, n)
    x, trajectory = prior(path), []
    ours = ours_fn(denoiser, path, x, t_grid, generator=torch.Generator().manual_seed(1), trajectory=trajectory,
                   **options)
    x_tilde, grid = start(path, x, t_grid, trajectory)
    k_options = dict(options)
    if "s_churn" in options:  # the same gamma = s_churn / n on the shorter grid of a flow
        k_options["s_churn"] = options["s_churn"] * (len(grid) - 1) / n
    g = noise_stream(1, skip=len(t_grid) - len(grid) if options else 0)
    monkeypatch.setattr(torch, "randn_like", lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype))
    reference = reference_fn(k_model(denoiser, path, grid), x_tilde, edm_sigmas(path, grid), disable=True,
                             **k_options)
    report(f"{sampler} {churn} {model}", ours, reference)


@pytest.mark.parametrize("sampler", [euler, heun])
def test_first_step_from_a_flow_prior_is_the_ddim_step(sampler):
    """From s = inf (alpha(1) = 0) Euler's step has the finite limit x~ = x0_hat + s_1 x1_hat: DDIM's eta = 0 step;
    Heun's trapezoid has none, so Heun takes that step too (checked against diffcli's ddim, itself checked
    against diffusers)."""
    denoiser = oracle("flow")
    path, x = denoiser.path, prior(denoiser.path)
    t_grid, trajectory = karras_grid(path, 6), []
    sampler(denoiser, path, x, t_grid, trajectory=trajectory)
    torch.testing.assert_close(trajectory[1], ddim(denoiser, path, x, t_grid[:2]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_euler_is_ddim_with_eta_zero(model):
    """Euler in EDM's variables is DDIM's eta = 0 step (Karras et al. 2022, sec. 3 / Song et al. 2021a, eq. 13)."""
    denoiser = oracle(model)
    path, x = denoiser.path, prior(denoiser.path)
    t_grid = uniform_grid(path, 10)
    torch.testing.assert_close(euler(denoiser, path, x, t_grid), ddim(denoiser, path, x, t_grid), rtol=0, atol=1e-9)


def test_heun_counts_its_evaluations():
    """2 evaluations a step, 1 on the step to s = 0, and 1 on a flow's first step from s = inf."""
    for model, nfe in [("vpsde", 2 * 6 - 1), ("flow", 2 * 6 - 2)]:
        denoiser = oracle(model)
        heun(denoiser, denoiser.path, prior(denoiser.path), karras_grid(denoiser.path, 6))
        assert denoiser.nfe == nfe, (model, denoiser.nfe)


# -------------------------------------------------------------------------------- DPM-Solver++

@pytest.mark.parametrize("model", MODELS)
def test_dpmpp_2m_matches_k_diffusion(model):
    denoiser = oracle(model)
    path, t_grid, x, trajectory = denoiser.path, logsnr_grid(denoiser.path, 10), prior(denoiser.path), []
    ours = dpmpp_2m(denoiser, path, x, t_grid, trajectory=trajectory)
    x_tilde, grid = start(path, x, t_grid, trajectory)
    reference = K.sample_dpmpp_2m(k_model(denoiser, path, grid), x_tilde, edm_sigmas(path, grid), disable=True)
    report(f"dpmpp_2m {model}", ours, reference)


SDE_OPTIONS = {"eta1": {}, "eta0": {"eta": 0.0}, "eta0.5-noise": {"eta": 0.5, "s_noise": 0.9}}


@pytest.mark.parametrize("options", list(SDE_OPTIONS))
@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_2m_sde-heun", "dpmpp_3m_sde"])
@pytest.mark.parametrize("model", MODELS)
def test_dpmpp_sde_solvers_match_k_diffusion(model, sampler, options):
    """k-diffusion's noise_sampler returns the noise diffcli draws: the same generator stream, one draw a step
    with eta > 0 except the step to s = 0."""
    name, _, solver_type = sampler.partition("-")
    ours_fn, reference_fn = {"dpmpp_2m_sde": (dpmpp_2m_sde, K.sample_dpmpp_2m_sde),
                             "dpmpp_3m_sde": (dpmpp_3m_sde, K.sample_dpmpp_3m_sde)}[name]
    extra = {"solver_type": solver_type} if solver_type else {}
    kwargs = {**SDE_OPTIONS[options], **extra}
    denoiser = oracle(model)
    path, t_grid, x, trajectory = denoiser.path, logsnr_grid(denoiser.path, 10), prior(denoiser.path), []
    ours = ours_fn(denoiser, path, x, t_grid, generator=torch.Generator().manual_seed(3), trajectory=trajectory,
                   **kwargs)
    x_tilde, grid = start(path, x, t_grid, trajectory)
    skipped = len(t_grid) - len(grid) if kwargs.get("eta", 1.0) > 0 else 0
    g = noise_stream(3, skip=skipped)
    reference = reference_fn(k_model(denoiser, path, grid), x_tilde, edm_sigmas(path, grid), disable=True,
                             noise_sampler=lambda s, s_next: torch.randn(x.shape, generator=g, dtype=F64), **kwargs)
    report(f"{sampler} {options} {model}", ours, reference)


@pytest.mark.parametrize("sampler", [dpmpp_2m_sde, dpmpp_3m_sde])
def test_dpmpp_sde_first_step_from_a_flow_prior(sampler):
    """From lambda = -inf (alpha(1) = 0): x_1 = (sigma_1/sigma_0) e^{-eta h} x + alpha_1 (1 - e^{-(1+eta) h}) x0_hat
    + sigma_1 sqrt(1 - e^{-2 eta h}) z tends, as h -> inf, to alpha_1 x0_hat + sigma_1 z for eta > 0."""
    denoiser = oracle("flow")
    path, x, t_grid, trajectory = denoiser.path, prior(denoiser.path), logsnr_grid(denoiser.path, 6), []
    sampler(denoiser, path, x, t_grid, generator=torch.Generator().manual_seed(5), trajectory=trajectory)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    t0, t1 = t_grid[0], t_grid[1]
    expected = path.alpha(t1) * denoiser(x, t0) + path.sigma(t1) * z
    torch.testing.assert_close(trajectory[1], expected, rtol=0, atol=1e-12)
    assert math.isclose(float(path.alpha(t0)), 0.0)
