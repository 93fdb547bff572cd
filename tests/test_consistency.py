"""Consistency models (Song et al. 2023): prediction `consistency`, the multistep sampler, the teacher's ODE step and
the CD loss, against openai/consistency_models (cm/karras_diffusion.py at commit e32b69e, transcribed below with
the lines named), diffcli's own heun / euler samplers, and the exact oracle on one Gaussian, all in float64."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from diffcli import DiffcliError
from diffcli.consistency import SOLVERS, cd_times, consistency_loss, ode_step, pseudo_huber
from diffcli.guidance import CountNFE
from diffcli.loading import model_denoiser
from diffcli.oracle import Oracle
from diffcli.paths import DDPMPath, FlowPath, SubVPPath, VEPath, VPPath
from diffcli.prediction import Denoiser, batch_times, check_prediction, consistency_scalings, convert, target, to_x0_x1
from diffcli.samplers import NEEDS, SAMPLERS, check_sampler, consistency, euler, heun

F64 = torch.float64
S_MIN, SD = 0.002, 0.5
V, M = 0.3, torch.tensor([0.5, -1.0], dtype=F64)  # one Gaussian N(M, V I)
PATHS = {"edm": VEPath(0.002, 80.0), "vp": VPPath(), "subvp": SubVPPath(), "flow": FlowPath(), "ddpm": DDPMPath()}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Net(torch.nn.Module):
    """A fixed smooth net F(x, c_noise) in float64: what a consistency model's network outputs."""

    def __init__(self, d=2, seed=0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, d, generator=gen(seed), dtype=F64))
        self.b = torch.nn.Parameter(torch.randn(d, generator=gen(seed + 1), dtype=F64))

    def forward(self, x, t):
        return torch.tanh(x @ self.w + t[:, None] * self.b)


def model(path, sigma_min=S_MIN, seed=0):
    """A consistency model on `path`: Net under EDM's preconditioning, boundary at sigma_min."""
    return Denoiser(Net(seed=seed), path, "consistency", precond="edm", sigma_data=SD, sigma_min=sigma_min)


# ---------------------------------------------------------------------------------------------
# openai/consistency_models, cm/karras_diffusion.py (commit e32b69e), transcribed


def append_dims(x, n):
    return x[(...,) + (None,) * (n - x.ndim)]


def reference_scalings(sigma, sigma_min=S_MIN, sigma_data=SD):
    """Lines 68-78, KarrasDenoiser.get_scalings_for_boundary_condition."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def reference_denoise(net, x_t, sigmas):
    """Lines 334-349, KarrasDenoiser.denoise with distillation=True, in EDM's x~; the net is fed diffcli's c_noise =
    ln(s)/4 (EDM's), consistency_models' 1000 * 0.25 * ln(s) divided by 1000."""
    c_skip, c_out, c_in = [append_dims(x, x_t.ndim) for x in reference_scalings(sigmas)]
    rescaled_t = 1000 * 0.25 * torch.log(sigmas + 1e-44)
    model_output = net(c_in * x_t, rescaled_t / 1000)
    return c_out * model_output + c_skip * x_t


def stochastic_iterative_sampler(distiller, x, generator, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40):
    """Lines 656-682 (Song et al. 2023, Alg. 1); generator.randn_like(x) is torch.randn with the generator."""
    t_max_rho = t_max ** (1 / rho)
    t_min_rho = t_min ** (1 / rho)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(ts) - 1):
        t = (t_max_rho + ts[i] / (steps - 1) * (t_min_rho - t_max_rho)) ** rho
        x0 = distiller(x, t * s_in)
        next_t = (t_max_rho + ts[i + 1] / (steps - 1) * (t_min_rho - t_max_rho)) ** rho
        next_t = min(max(next_t, t_min), t_max)  # np.clip
        x = x0 + torch.randn(x.shape, generator=generator, dtype=x.dtype) * math.sqrt(next_t**2 - t_min**2)
    return x


def reference_levels(num_scales, indices, sigma_min=S_MIN, sigma_max=80.0, rho=7.0):
    """Lines 178-187, the levels t (and t2 at indices + 1) of consistency_losses, from sigma_max down."""
    t = sigma_max ** (1 / rho) + indices / (num_scales - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return t**rho


# ---------------------------------------------------------------------------------------------
# prediction `consistency`


@pytest.mark.parametrize("name", PATHS)
def test_scalings_are_consistency_models(name):
    """(c_skip / alpha) alpha and c_out equal get_scalings_for_boundary_condition at s = sigma/alpha."""
    path = PATHS[name]
    t = torch.tensor([1e-3, 0.05, 0.3, 0.6, 0.9, 0.99], dtype=F64)
    a, sigma = path.alpha(t), path.sigma(t)
    c_skip_over_alpha, c_out = consistency_scalings(a, sigma, S_MIN, SD)
    ref_skip, ref_out, _ = reference_scalings(sigma / a)
    assert torch.allclose(c_skip_over_alpha * a, ref_skip, rtol=1e-12, atol=1e-12)
    assert torch.allclose(c_out, ref_out, rtol=1e-12, atol=1e-12)


def test_scalings_are_finite_where_alpha_is_zero():
    """A flow's t = 1 (s = inf): c_skip x~ -> 0, c_out -> sigma_data, the limits of the reference's formula."""
    path = FlowPath()
    c_skip_over_alpha, c_out = consistency_scalings(path.alpha(torch.ones(1, dtype=F64)),
                                                    path.sigma(torch.ones(1, dtype=F64)), S_MIN, SD)
    assert c_skip_over_alpha.item() == 0 and c_out.item() == pytest.approx(SD, abs=1e-15)
    assert reference_scalings(torch.tensor(1e12, dtype=F64))[1].item() == pytest.approx(SD, rel=1e-12)


@pytest.mark.parametrize("name", PATHS)
def test_boundary_is_the_identity(name):
    """f(x, s_min) = x~ whatever the net outputs (Song et al. 2023, eq. 4's boundary condition)."""
    path = PATHS[name]
    d = model(path)
    t_b = path.t_from_s(torch.full((8,), S_MIN, dtype=F64))
    x_t = 3 * torch.randn(8, 2, generator=gen(1), dtype=F64)
    error = (d(x_t, t_b) - x_t / path.alpha(t_b)[:, None]).abs().max().item()
    assert error < 1e-12, error
    assert (model(path, seed=5)(x_t, t_b) - d(x_t, t_b)).abs().max() < 1e-12  # the net does not matter there
    assert (d(x_t, torch.full((8,), 0.5, dtype=F64)) - x_t / path.alpha(torch.tensor(0.5))).abs().max() > 0.1


@pytest.mark.parametrize("name", ["edm", "vp", "flow"])
def test_denoiser_is_the_reference_denoise(name):
    """Denoiser(prediction=consistency, precond=edm) equals KarrasDenoiser.denoise (distillation=True) on x~."""
    path = PATHS[name]
    d = model(path)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.95], dtype=F64)
    x_t = torch.randn(5, 2, generator=gen(2), dtype=F64)
    a = path.alpha(t)[:, None]
    expected = reference_denoise(d.net, x_t / a, path.sigma(t) / path.alpha(t))
    assert torch.allclose(d(x_t, t), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", PATHS)
def test_consistency_round_trips(name):
    """(x0, x1) rebuild x_t; converted to eps, F or x0 and back they give the same x0_hat; target refuses it."""
    path = PATHS[name]
    t = torch.tensor([0.02, 0.3, 0.7, 0.97], dtype=F64)
    x_t = torch.randn(4, 2, generator=gen(3), dtype=F64)
    pred = torch.randn(4, 2, generator=gen(4), dtype=F64)
    x0, x1 = to_x0_x1(pred, "consistency", path, x_t, t, SD, S_MIN)
    assert torch.allclose(path.marginal(x0, x1, t), x_t, atol=1e-12)
    for dest in ("eps", "F", "x0", "velocity"):
        other = convert(pred, "consistency", dest, path, x_t, t, SD, sigma_min=S_MIN)
        assert torch.allclose(to_x0_x1(other, dest, path, x_t, t, SD)[0], x0, atol=1e-10), dest
    assert check_prediction("consistency", path) == "consistency"
    with pytest.raises(DiffcliError, match="no regression target") as refused:
        target("consistency", path, x0, x1, t)
    assert "\n" not in str(refused.value)


def test_sigma_min_travels_with_the_denoiser():
    """model.sigma_min reaches the Denoiser (unset: 0), and the wrappers samplers see report it."""
    path = PATHS["edm"]
    cfg = OmegaConf.create({"prediction": "consistency", "precond": "edm", "sigma_data": SD, "sigma_min": S_MIN})
    assert model_denoiser(Net(), path, cfg).sigma_min == S_MIN
    assert CountNFE(model_denoiser(Net(), path, cfg)).sigma_min == S_MIN
    assert model_denoiser(Net(), path, OmegaConf.merge(cfg, {"sigma_min": None})).sigma_min == 0.0


# ---------------------------------------------------------------------------------------------
# the sampler


@pytest.mark.parametrize("ts", [[0, 39], [0, 22, 39], [0, 10, 20, 30, 39]], ids=["1", "2", "4"])
@pytest.mark.parametrize("name", ["edm", "vp", "flow"])
def test_sampler_is_stochastic_iterative_sampler(name, ts):
    """diffcli's consistency sampler equals stochastic_iterative_sampler (over KarrasDenoiser.denoise) on the same
    levels and noise: the grid is the reference's levels but the last, mapped to t, then t = 0."""
    path, steps, rho, t_min, t_max = PATHS[name], 40, 7.0, S_MIN, 80.0
    levels = torch.tensor([(t_max ** (1 / rho) + i / (steps - 1) * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
                           for i in ts], dtype=F64)
    t_grid = torch.cat([path.t_from_s(levels[:-1]), torch.zeros(1, dtype=F64)])
    x_tilde = t_max * torch.randn(16, 2, generator=gen(5), dtype=F64)
    d = model(path)
    expected = stochastic_iterative_sampler(lambda x, s: reference_denoise(d.net, x, s), x_tilde, gen(6), ts)
    counted, trajectory = CountNFE(d), []
    got = consistency(counted, path, path.alpha(t_grid[0]) * x_tilde, t_grid, generator=gen(6), trajectory=trajectory)
    assert (got - expected).abs().max() < 1e-6
    assert counted.nfe == len(ts) - 1 and len(trajectory) == len(ts)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_with_the_exact_flow_map_draws_the_data(steps):
    """With N(M, V I)'s exact consistency function every step's re-noised x~ is the marginal at its level, so any
    number of steps draws N(M, (V + s_min^2) I); the oracle's x0_hat in its place draws far too narrow a cloud."""
    path, n = PATHS["vp"], 8000
    t_grid = torch.cat([torch.linspace(1, 1 / steps, steps, dtype=F64), torch.zeros(1, dtype=F64)])
    x = path.marginal(M + math.sqrt(V) * torch.randn(n, 2, generator=gen(16), dtype=F64),
                      torch.randn(n, 2, generator=gen(17), dtype=F64), torch.ones(n, dtype=F64))
    got = consistency(flow_map(path, S_MIN), path, x, t_grid, generator=gen(18))
    assert (got.mean(0) - M).abs().max() < 0.03 and (got.var(0) - (V + S_MIN**2)).abs().max() < 0.03, got.var(0)
    narrow = consistency(teacher(path, one_gaussian()), path, x, t_grid, generator=gen(18))
    assert (narrow.var(0) < V - 0.1).all(), narrow.var(0)


def test_sampler_needs_a_gaussian_prior():
    assert NEEDS["consistency"] == ("gaussian prior",) and SAMPLERS["consistency"] is consistency
    check_sampler("consistency", FlowPath())
    with pytest.raises(DiffcliError, match="Gaussian prior"):
        check_sampler("consistency", FlowPath(prior="uniform"))


def test_sampler_config_builds():
    """sampler=consistency composes and builds: 2 steps by default, evaluated at t = 1 and 0.5."""
    from conftest import compose_config

    from diffcli.build import SAMPLER_FNS
    from diffcli.sampling import sampler_from_config

    assert "diffcli.samplers.consistency" in SAMPLER_FNS
    fn, grid = sampler_from_config(compose_config("sample", ["sampler=consistency"]).sampler, PATHS["vp"])
    assert fn.func is consistency and grid.tolist() == [1.0, 0.5, 0.0]


# ---------------------------------------------------------------------------------------------
# the teacher's ODE step and the CD loss


GMM = {"kind": "toy", "name": "gmm", "params": {}}


def teacher(path, data=GMM):
    """The exact denoiser E[x0 | x_t] of a Gaussian mixture (net=oracle)."""
    return Denoiser(Oracle((2,), data, path, "x0"), path, "x0")


@pytest.mark.parametrize("solver,sampler", [("heun", heun), ("euler", euler)])
@pytest.mark.parametrize("name", PATHS)
def test_ode_step_is_the_samplers_step(name, solver, sampler):
    """ode_step with a time per example equals diffcli's heun / euler sampler run on each grid [t_i, t_next_i]."""
    path, oracle = PATHS[name], teacher(PATHS[name])
    t = torch.tensor([0.9, 0.6, 0.3, 0.1, 0.02], dtype=F64)
    t_next = torch.tensor([0.7, 0.5, 0.1, 0.05, 0.005], dtype=F64)
    x0, x1 = torch.randn(5, 2, generator=gen(7), dtype=F64), torch.randn(5, 2, generator=gen(8), dtype=F64)
    x_t = path.marginal(x0, x1, t)
    got = ode_step(oracle, path, x_t, t, t_next, solver)
    expected = torch.cat([sampler(oracle, path, x_t[i:i + 1], torch.stack([t[i], t_next[i]])) for i in range(5)])
    assert (got - expected).abs().max() < 1e-10


def test_ode_step_refuses_an_unknown_solver():
    with pytest.raises(DiffcliError, match="solver=rk4 is unknown"):
        ode_step(teacher(PATHS["vp"]), PATHS["vp"], torch.zeros(1, 2, dtype=F64), torch.ones(1), torch.ones(1), "rk4")


@pytest.mark.parametrize("name", PATHS)
def test_cd_times_are_the_reference_levels(name):
    """cd_times' levels are consistency_losses' t (reversed: ascending), as path times; s_min is returned."""
    path, n = PATHS[name], 18
    times, s_min = cd_times(path, n)
    expected = reference_levels(n, torch.arange(n, dtype=F64)).flip(0)
    assert s_min == S_MIN and torch.allclose(path.sigma(times) / path.alpha(times), expected, rtol=1e-10)
    assert (times.diff() > 0).all() and 0 <= times[0] and times[-1] <= 1
    assert cd_times(VEPath(0.01, 50.0), n)[1] == 0.01  # clipped to the path's own levels
    for bad in ({"N": 1}, {"N": 5, "s_min": 1.0, "s_max": 0.5}):
        with pytest.raises(DiffcliError):
            cd_times(path, **bad)




def one_gaussian():
    """N(M, V I) as a data config (a one-component gmm), which net=oracle knows."""
    covs = [(V * torch.eye(2, dtype=F64)).tolist()]
    return {"kind": "toy", "name": "gmm", "params": {"means": [M.tolist()], "covs": covs}}


def flow_map(path, s_min):
    """The exact consistency function of N(M, V I): x~(s_min) = M + sqrt((s_min^2 + V) / (s^2 + V)) (x~ - M)."""
    def f(x_t, t, labels=None):
        t = batch_times(t, x_t)
        a, s = path.alpha(t)[:, None], (path.sigma(t) / path.alpha(t))[:, None]
        return M + torch.sqrt((s_min**2 + V) / (s**2 + V)) * (x_t / a - M)
    return f


def heun_factor(s, s_next):
    """Heun's step of dy/ds = y s / (V + s^2) (y = x~ - M on N(M, V I)'s ODE) as a factor on y."""
    slope = lambda u: u / (V + u**2)  # noqa: E731
    h = s_next - s
    return 1 + h / 2 * (slope(s) + slope(s_next) * (1 + h * slope(s)))


def cd_losses(path, n_levels, b=4096):
    """On N(M, V I) with the exact teacher: the CD loss of the exact flow map (Heun's and Euler's step), of the
    oracle's x0_hat as student, and Heun's local error through the flow map computed in closed form."""
    oracle = teacher(path, one_gaussian())
    times, s_min = cd_times(path, n_levels)
    x0 = M + math.sqrt(V) * torch.randn(b, 2, generator=gen(9), dtype=F64)
    z = torch.randn(b, 2, generator=gen(10), dtype=F64)
    n = torch.randint(0, n_levels - 1, (b,), generator=gen(11))
    f = flow_map(path, s_min)
    losses = {solver: consistency_loss(f, f, oracle, path, x0, z, n, times, solver).item() for solver in SOLVERS}
    losses["oracle"] = consistency_loss(oracle, oracle, oracle, path, x0, z, n, times).item()
    # Heun's local error: k_n^2 (heun - exact)^2 (x~_{n+1} - M)^2, with k_n the flow map's factor at s_n
    s = path.sigma(times) / path.alpha(times)
    s_n, s_next = s[n][:, None], s[n + 1][:, None]
    y = path.marginal(x0, z, times[n + 1]) / path.alpha(times[n + 1])[:, None] - M
    error = heun_factor(s_next, s_n) - torch.sqrt((V + s_n**2) / (V + s_next**2))
    losses["local error"] = ((torch.sqrt((s_min**2 + V) / (s_n**2 + V)) * error * y) ** 2).mean().item()
    return losses


@pytest.mark.parametrize("name", ["edm", "vp", "flow"])
def test_cd_loss_of_the_exact_flow_map_is_heuns_local_error(name):
    """On one Gaussian with the exact teacher, the exact flow map's CD loss is Heun's local error through it: 7.7e-8
    at N = 40 on every path, falling as N^-6 (Euler's as N^-4); the oracle's x0_hat as student scores 5.2e-4."""
    coarse, fine = cd_losses(PATHS[name], 40), cd_losses(PATHS[name], 100)
    assert coarse["heun"] == pytest.approx(coarse["local error"], rel=1e-8), coarse
    assert coarse["heun"] < 1e-6 and coarse["oracle"] > 1e3 * coarse["heun"], coarse
    order = {k: math.log(coarse[k] / fine[k]) / math.log(100 / 40) for k in SOLVERS}
    assert 5 < order["heun"] < 7 and 3 < order["euler"] < 5, order


def test_cd_loss_trains_the_student_only():
    """Gradients reach the student, not the target or the teacher; pseudo-Huber is sqrt(|x - y|^2 + c^2) - c."""
    path = PATHS["edm"]
    student, ema, oracle = model(path, seed=0), model(path, seed=3), teacher(path)
    times, _ = cd_times(path, 10)
    x0, z = torch.randn(32, 2, generator=gen(12), dtype=F64), torch.randn(32, 2, generator=gen(13), dtype=F64)
    n = torch.randint(0, 9, (32,), generator=gen(14))
    loss = consistency_loss(student, ema, oracle, path, x0, z, n, times, distance="pseudo_huber")
    loss.backward()
    assert loss.item() > 0 and student.net.w.grad.abs().sum() > 0 and ema.net.w.grad is None
    x, y = torch.randn(3, 2, 4, generator=gen(15), dtype=F64), torch.zeros(3, 2, 4, dtype=F64)
    c = 0.00054 * math.sqrt(8)
    assert torch.allclose(pseudo_huber(x, y), torch.sqrt((x**2).sum((1, 2)) + c**2) - c, rtol=1e-14)
    with pytest.raises(DiffcliError, match="distance=l1 is unknown"):
        consistency_loss(student, ema, oracle, path, x0, z, n, times, distance="l1")
