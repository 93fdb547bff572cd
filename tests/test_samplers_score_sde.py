"""pc against score_sde's pc_sampler (ReverseDiffusionPredictor / EulerMaruyamaPredictor + LangevinCorrector), step
by step in float64 with the exact oracle's score, on the same noise.

The reference is transcribed below from yang-song/score_sde_pytorch at cb1f359f4aadf0ff9a5e122fe8fffc9451fd6e44
(sampling.py, sde_lib.py; lines named where used). The model (the oracle's score -x1_hat / sigma) is shared.
"""

import math

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from diffcli import DiffcliError
from diffcli.data import build_data
from diffcli.samplers.grids import uniform_grid
from diffcli.paths import SubVPPath, VEPath, VPPath
from diffcli.prediction import Denoiser
from diffcli.samplers import pc

F64 = torch.float64
N, EPS = 30, 1e-3  # score_sde's sde.N and sampling eps; N > beta_max = 20 keeps its VP betas below 1


def oracle(model):
    cfg = compose_config("train", ["data=eight_gaussians", "net=oracle", f"model={model}"])
    data = build_data(cfg.data, torch.device("cpu"))
    return Denoiser(instantiate(cfg.net, shape=data.shape), instantiate(cfg.model.path), cfg.model.prediction)


# ---------------------------------------------------------------------------- score_sde, transcribed

def norm_mean(v):
    return torch.norm(v.reshape(v.shape[0], -1), dim=-1).mean()


def sde(path, x, t):
    """(drift, diffusion) of the forward SDE: VPSDE.sde (sde_lib.py L135-139), subVPSDE.sde (L185-190),
    VESDE.sde (L226-231)."""
    if isinstance(path, VEPath):
        sigma = path.sigma_min * (path.sigma_max / path.sigma_min) ** t
        return torch.zeros_like(x), sigma * math.sqrt(2 * (math.log(path.sigma_max) - math.log(path.sigma_min)))
    beta_t = path.beta_min + t * (path.beta_max - path.beta_min)
    drift = -0.5 * beta_t * x
    if isinstance(path, SubVPPath):
        discount = 1.0 - torch.exp(-2 * path.beta_min * t - (path.beta_max - path.beta_min) * t**2)
        return drift, torch.sqrt(beta_t * discount)
    return drift, torch.sqrt(beta_t)


def discretize(path, x, t):
    """(f, G): VPSDE.discretize (sde_lib.py L156-164, tables L125-126), VESDE.discretize (L246-254, table L219),
    and SDE.discretize's Euler-Maruyama default (L52-69) for subVPSDE, which has no override."""
    timestep = int(t * (N - 1))  # (t * (self.N - 1) / self.T).long()
    if type(path) is VPPath:
        discrete_betas = torch.linspace(path.beta_min / N, path.beta_max / N, N, dtype=F64)
        alphas = 1.0 - discrete_betas
        return torch.sqrt(alphas[timestep]) * x - x, torch.sqrt(discrete_betas[timestep])
    if isinstance(path, VEPath):
        discrete_sigmas = torch.exp(torch.linspace(math.log(path.sigma_min), math.log(path.sigma_max), N, dtype=F64))
        adjacent_sigma = 0.0 if timestep == 0 else discrete_sigmas[timestep - 1]
        return torch.zeros_like(x), torch.sqrt(discrete_sigmas[timestep] ** 2 - adjacent_sigma**2)
    dt = 1 / N
    drift, diffusion = sde(path, x, t)
    return drift * dt, diffusion * math.sqrt(dt)


def langevin_corrector(path, score_fn, x, t, snr, n_steps, g):
    """LangevinCorrector.update_fn (sampling.py L262-282). Its alpha reads sde.alphas (VPSDE's table, sde_lib.py
    L126) for VP and sub-VP; score_sde's own subVPSDE lacks that table (issue #8), so sub-VP takes VPSDE's."""
    if isinstance(path, VPPath):  # VPSDE or subVPSDE
        alpha = 1.0 - torch.linspace(path.beta_min / N, path.beta_max / N, N, dtype=F64)[int(t * (N - 1))]
    else:
        alpha = 1.0
    for _ in range(n_steps):
        grad = score_fn(x, t)
        noise = torch.randn(x.shape, generator=g, dtype=F64)
        step_size = (snr * norm_mean(noise) / norm_mean(grad)) ** 2 * 2 * alpha
        x_mean = x + step_size * grad
        x = x_mean + torch.sqrt(step_size * 2) * noise
    return x


def reverse_diffusion_predictor(path, score_fn, x, t, g):
    """ReverseDiffusionPredictor.update_fn (sampling.py L195-200) with RSDE.discretize (sde_lib.py L102-107)."""
    f, G = discretize(path, x, t)
    rev_f = f - G**2 * score_fn(x, t)
    z = torch.randn(x.shape, generator=g, dtype=F64)
    x_mean = x - rev_f
    return x_mean + G * z, x_mean


def euler_maruyama_predictor(path, score_fn, x, t, g):
    """EulerMaruyamaPredictor.update_fn (sampling.py L181-187) with RSDE.sde (sde_lib.py L93-100)."""
    dt = -1.0 / N
    z = torch.randn(x.shape, generator=g, dtype=F64)
    drift, diffusion = sde(path, x, t)
    drift = drift - diffusion**2 * score_fn(x, t)
    x_mean = x + drift * dt
    return x_mean + diffusion * math.sqrt(-dt) * z, x_mean


def pc_sampler(path, score_fn, x, predictor, snr, n_steps, seed):
    """pc_sampler (sampling.py L399-409): corrector then predictor at each of linspace(1, eps, N); x_mean at the end.
    Returns every state, as diffcli's trajectory does."""
    g = torch.Generator().manual_seed(seed)
    states = [x]
    for t in torch.linspace(1.0, EPS, N, dtype=F64):
        x = langevin_corrector(path, score_fn, x, t, snr, n_steps, g)
        x, x_mean = predictor(path, score_fn, x, t, g)
        states.append(x)
    states[-1] = x_mean
    return states


# ---------------------------------------------------------------------------------------------- tests

PREDICTORS = {"reverse_diffusion": reverse_diffusion_predictor, "euler_maruyama": euler_maruyama_predictor}


@pytest.mark.parametrize("n_corrector, snr", [(1, 0.16), (2, 0.075)])
@pytest.mark.parametrize("predictor", list(PREDICTORS))
@pytest.mark.parametrize("model", ["vpsde", "subvpsde", "vesde"])
def test_pc_matches_score_sde_step_by_step(model, predictor, n_corrector, snr):
    denoiser = oracle(model)
    path = denoiser.path
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * path.sigma(torch.tensor(1.0))
    score_fn = lambda x, t: -denoiser.predict(x, t)[1] / path.sigma(t)  # noqa: E731  (the shared model)
    reference = pc_sampler(path, score_fn, x, PREDICTORS[predictor], snr, n_corrector, seed=1)
    trajectory = []
    pc(denoiser, path, x, uniform_grid(path, N, t_min=EPS), predictor=predictor, snr=snr, n_corrector=n_corrector,
       generator=torch.Generator().manual_seed(1), trajectory=trajectory)
    error = max((a - b).abs().max().item() for a, b in zip(trajectory, reference, strict=True))
    print(f"pc {predictor} n_corrector={n_corrector} {model}: max |diffcli - score_sde| = {error:.2e}")
    assert error < 1e-8


def test_uniform_grid_has_score_sde_timesteps():
    """diffcli's uniform grid is score_sde's linspace(1, eps, N) followed by t = 0: the same N steps."""
    grid = uniform_grid(VPPath(), N, t_min=EPS)
    assert torch.equal(grid[:-1], torch.linspace(1.0, EPS, N, dtype=F64)) and grid[-1] == 0


def test_pc_refuses_steps_where_score_sde_betas_exceed_one():
    denoiser = oracle("vpsde")
    with pytest.raises(DiffcliError, match="steps>=20"):
        pc(denoiser, denoiser.path, torch.zeros(4, 2, dtype=F64), uniform_grid(denoiser.path, 19))
