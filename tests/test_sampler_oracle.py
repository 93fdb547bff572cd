"""Samplers with the exact oracle denoiser (net=oracle): quality of every valid sampler-formulation
pair, convergence orders against a tight dopri5 solution, the probability-flow ODE as a map from
data to prior, and mixture weights recovered by Langevin and predictor-corrector sampling."""

import math

import pytest
import scipy.stats
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config
from diffcli import DiffcliError
from diffcli.data import build_data
from diffcli.metrics import sliced_wasserstein
from diffcli.prediction import Denoiser
from diffcli.sampling import generate, sampler_from_config
from diffcli.samplers import NEEDS, check_sampler

FORMULATIONS = {"ddpm": ["model=ddpm"], "ncsn": ["model=ncsn"], "vesde": ["model=vesde"], "vpsde": ["model=vpsde"],
                "subvpsde": ["model=subvpsde"], "flow": ["model=flow"],
                "flow-uniform": ["model=flow", "model.prior=uniform"]}
N = 2000


def oracle(model, data="eight_gaussians"):
    cfg = compose_config("train", [f"data={data}", "net=oracle", *FORMULATIONS[model]])
    data = build_data(cfg.data, torch.device("cpu"))
    return Denoiser(instantiate(cfg.net, shape=data.shape), instantiate(cfg.model.path), cfg.model.prediction), data


def draw(denoiser, sampler, overrides=(), n=N, seed=0):
    fn, grid = sampler_from_config(compose_config("sample", [f"sampler={sampler}", *overrides]).sampler,
                                   denoiser.path)
    return generate(denoiser, fn, grid, n, (2,), batch_size=n, seed=seed, device=torch.device("cpu")).samples


def default_options(sampler):
    """The sampler's options as its YAML sets them (e.g. dpmpp_2m_sde's eta = 1)."""
    fn = OmegaConf.to_container(compose_config("sample", [f"sampler={sampler}"]).sampler.fn, resolve=True)
    return {k: v for k, v in fn.items() if k not in ("_target_", "_partial_")}


def valid(sampler, path):
    try:
        check_sampler(sampler, path, **default_options(sampler))
        return True
    except DiffcliError:
        return False


# consistency sampling needs a consistency function (prediction consistency), which the oracle's E[x0 | x_t] is not:
# tests/test_consistency.py samples the exact one of a Gaussian
PAIRS = [(m, s) for m in FORMULATIONS for s in NEEDS if s != "consistency" and valid(s, oracle(m)[0].path)]


@pytest.mark.slow
@pytest.mark.parametrize("model, sampler", PAIRS, ids=[f"{m}-{s}" for m, s in PAIRS])
def test_every_valid_pair_reaches_data_quality_at_default_steps(model, sampler):
    denoiser, data = oracle(model)
    x = draw(denoiser, sampler)
    reference = data.sample(N, torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(data.sample(N, torch.Generator().manual_seed(2)), reference)
    assert torch.isfinite(x).all()
    assert sliced_wasserstein(x, reference) < floor + 0.06, (floor, sliced_wasserstein(x, reference))


@pytest.mark.parametrize("model, sampler", [("flow-uniform", s) for s in ("ancestral", "euler_maruyama", "pc",
                                                                         "langevin")]
                         + [("vpsde", "rk4"), ("vpsde", "midpoint"), ("ddpm", "rk4")])
def test_invalid_pairs_refuse_in_one_line(model, sampler):
    denoiser, _ = oracle(model)
    with pytest.raises(DiffcliError) as e:
        draw(denoiser, sampler, n=4)
    assert "\n" not in str(e.value) and f"sampler={sampler}" in str(e.value)


def reference_solution(denoiser, x, t_start, t_end):
    """The ODE dx/dt = alpha' x0 + sigma' x1 solved by torchdiffeq's dopri5 at tight tolerance."""
    from torchdiffeq import odeint

    path = denoiser.path

    def velocity(t, x):
        x0, x1 = denoiser.predict(x, t.double())
        return path.d_alpha(t.double()) * x0 + path.d_sigma(t.double()) * x1

    times = torch.tensor([t_start, t_end], dtype=torch.float64)
    return odeint(velocity, x, times, method="dopri5", rtol=1e-10, atol=1e-10)[-1]


@pytest.mark.parametrize("model", ["vpsde", "flow"])
@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_ode_samplers_converge_at_their_order(model, sampler, order):
    """Error against dopri5 at N and 2N steps on [1, 0.05] of a uniform grid: ratio ~ 2^order."""
    from diffcli.samplers import SAMPLERS

    denoiser, _ = oracle(model)
    x1 = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_init = x1 * denoiser.path.sigma(torch.tensor(1.0, dtype=torch.float64))
    exact = reference_solution(denoiser, x_init, 1.0, 0.05)
    errors = []
    from diffcli.samplers import logsnr_grid

    for steps in (16, 32, 64):
        # each solver on its own kind of grid: DPM-Solver steps in lambda = log(alpha/sigma), and on a
        # uniform-t grid a flow's first lambda-steps (log((k+1)/k) near t = 1) never shrink with N
        grid = (logsnr_grid(denoiser.path, steps + 1, t_min=0.05)[:-1] if sampler == "dpmpp_2m"
                else torch.linspace(1.0, 0.05, steps + 1, dtype=torch.float64))
        errors.append((SAMPLERS[sampler](denoiser, denoiser.path, x_init, grid) - exact).norm(dim=1).mean().item())
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(order - 0.35 < r < order + 0.6 for r in rates), (errors, rates)


def test_probability_flow_maps_data_to_the_prior():
    """Run the oracle's PF-ODE forward from data (t = 1e-3) to t = 1: the result is standard normal."""
    denoiser, data = oracle("vpsde")
    x0 = data.sample(4000, torch.Generator().manual_seed(0)).double()
    x_end = reference_solution(denoiser, x0, 1e-3, 1.0)
    assert x_end.mean(0).abs().max() < 0.06
    torch.testing.assert_close(torch.cov(x_end.T), torch.eye(2, dtype=torch.float64), atol=0.07, rtol=0)
    theta = torch.randn(2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    projections = x_end @ (theta / theta.norm(dim=0))
    for j in range(projections.shape[1]):  # D'Agostino-Pearson on each random direction
        assert scipy.stats.normaltest(projections[:, j].numpy()).pvalue > 1e-3
    # and the data itself is far from normal (the test has power)
    assert scipy.stats.normaltest((x0 @ (theta / theta.norm(dim=0)))[:, 0].numpy()).pvalue < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("model, sampler", [("ncsn", "langevin"), ("vesde", "pc"), ("vpsde", "pc")])
def test_langevin_and_pc_recover_mixture_weights(model, sampler):
    denoiser, data = oracle(model, data="gmm")
    x = draw(denoiser, sampler, n=4000)
    modes = data.modes.cpu().double()
    counts = torch.bincount(torch.cdist(x.double(), modes).argmin(1), minlength=len(modes)).double()
    # the same nearest-mean rule on true data gives the weights it should find (components overlap)
    truth = data.sample(40_000, torch.Generator().manual_seed(3)).double()
    expected = torch.bincount(torch.cdist(truth, modes).argmin(1), minlength=len(modes)).double() / len(truth)
    assert (counts / counts.sum() - expected).abs().max() < 0.05, (counts / counts.sum(), expected)


def test_trajectory_and_field_pictures(tmp_path):
    """`sample.save_trajectory` keeps every visited state (the last is the sample); pictures are drawn."""
    import numpy as np

    from diffcli.sample import run_sample
    from diffcli.train import run_train

    run_train(compose_config("train", ["data=gmm", "net=oracle", "model=flow", "device=cpu"]), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "ema_0.safetensors").is_file()  # nothing to train
    run_sample(compose_config("sample", [f"ckpt={tmp_path / 'run'}", "sampler=heun", "steps=6", "n=300",
                                         "sample.save_trajectory=true", "sample.plot_field=true", "device=cpu"]),
               tmp_path / "s")
    saved = np.load(tmp_path / "s" / "samples.npz")
    # Heun on a flow: 1 evaluation on the first step (from s = inf, an Euler step), 2 per step, 1 on the last
    assert saved["trajectory"].shape == (7, 300, 2) and int(saved["nfe"]) == 10
    np.testing.assert_array_equal(saved["trajectory"][-1], saved["samples"])
    np.testing.assert_allclose(saved["t_grid"][[0, -1]], [1.0, 0.0])
    for picture in ("samples.png", "trajectories.png", "field.png"):
        assert (tmp_path / "s" / picture).stat().st_size > 10_000
