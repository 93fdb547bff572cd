"""model=edm and its pieces (prediction F, precond edm, lognormal / logit-normal times, weightings edm and
min_snr) against NVlabs/edm's reference code, transcribed below, and against closed forms."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, run_cli, sample_checkpoint
from diffcli import DiffcliError
from diffcli.losses import denoising_loss, pair_loss
from diffcli.paths import DDPMPath, FlowPath, NCSNPath, SubVPPath, VEPath, VPPath, check_times
from diffcli.prediction import S_RANGE, Denoiser, edm_inputs, target, to_x0_x1

SD = 0.5  # sigma_data
EDM = VEPath(0.002, 80.0)
PATHS = {"edm": EDM, "ve": VEPath(0.01, 50.0), "vp": VPPath(), "subvp": SubVPPath(), "flow": FlowPath(),
         "flow_uniform": FlowPath(prior="uniform")}


# --- NVlabs/edm, commit 008a4e5316c8e3bfe61a62f874bddba254295afb, transcribed in float64 (its float32 casts,
# networks.py:655-656, dropped) --------------------------------------------------------------------------------

def edm_precond(F, x, sigma, sigma_data=SD):
    """training/networks.py:656 and 660-667, EDMPrecond.forward: D(x; sigma) from the raw network F."""
    sigma = sigma.reshape(-1, 1)  # :656 (reshape(-1, 1, 1, 1) there, for images)
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)  # :660
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()  # :661
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()  # :662
    c_noise = sigma.log() / 4  # :663
    F_x = F((c_in * x), c_noise.flatten())  # :665
    D_x = c_skip * x + c_out * F_x  # :667
    return D_x


def edm_loss(D, y, n, sigma, sigma_data=SD):
    """training/loss.py:75-79, EDMLoss.__call__, with the draws of :73-74 (sigma) and :77 (n) given."""
    sigma = sigma.reshape(-1, 1)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2  # :75
    D_yn = D(y + n, sigma)  # :78
    loss = weight * ((D_yn - y) ** 2)  # :79
    return loss


def edm_sigma(z, P_mean=-1.2, P_std=1.2):
    """training/loss.py:74: sigma from EDM's standard normal draw rnd_normal (:73)."""
    return (z * P_std + P_mean).exp()


# -------------------------------------------------------------------------------------------------------------

class RawF(torch.nn.Module):
    """A fixed nonlinear 'network' F(x_in, c_noise) in float64: what EDMPrecond's self.model is."""

    def __init__(self, d=3):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.b = torch.randn(d, generator=g, dtype=torch.float64)

    def forward(self, x_in, c_noise):
        return torch.tanh(x_in @ self.w + c_noise[:, None] * self.b) + 0.3 * x_in


def edm_D_on(path, F, x_t, t):
    """EDM's D on any path: EDMPrecond at x~ = x_t / alpha and sigma = sigma(t) / alpha(t) (its eq. 7 scaling)."""
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    return edm_precond(F, x_t / a, (s / a)[:, 0])


class PredictsFromD(torch.nn.Module):
    """Takes x_t and t as they are and outputs `prediction` of EDM's D (transcribed): the same denoiser as
    RawF under EDM's preconditioning, written in another parameterization."""

    raw_input = True

    def __init__(self, path, prediction, F):
        super().__init__()
        self.path, self.prediction, self.F = path, prediction, F

    def forward(self, x_t, t):
        x0 = edm_D_on(self.path, self.F, x_t, t)
        x1 = (x_t - self.path.alpha(t)[:, None] * x0) / self.path.sigma(t)[:, None]
        return target(self.prediction, self.path, x0, x1, t)


def draws(path, n=64, d=3, seed=0, lo=0.05, hi=0.95):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    x1 = path.sample_prior((n, d), g, "cpu").double()
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return x0, x1, t


@pytest.mark.parametrize("name", list(PATHS))
def test_denoiser_is_edm_precond(name):
    """Denoiser(F, precond=edm)(x_t, t) = EDMPrecond's D at x~ = x_t / alpha, sigma/alpha, on every path."""
    path, F = PATHS[name], RawF()
    x0, x1, t = draws(path)
    x_t = path.marginal(x0, x1, t)
    ours = Denoiser(F, path, "F", precond="edm")(x_t, t)
    diff = (ours - edm_D_on(path, F, x_t, t)).abs().max().item()
    assert diff < 1e-12, diff


def test_denoiser_at_edm_noise_levels():
    """On EDM's own path, at sigmas across [0.002, 80] and EDM's scalar-sigma call: the same D."""
    F, sigma = RawF(), torch.logspace(math.log10(0.002), math.log10(80), 50, dtype=torch.float64)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigma[:, None]
    denoiser = Denoiser(F, EDM, "F", precond="edm")
    torch.testing.assert_close(denoiser(x, EDM.t_from_s(sigma)), edm_precond(F, x, sigma), rtol=0, atol=1e-12)
    one = denoiser(x[:5], EDM.t_from_s(sigma[20]))  # a scalar t for the whole batch
    torch.testing.assert_close(one, edm_precond(F, x[:5], sigma[20].expand(5)), rtol=0, atol=1e-12)


def test_c_noise_is_clamped_at_the_ends():
    """c_noise = ln(s)/4 is finite where s = 0 (t = 0) and where alpha = 0 (a flow's t = 1); c_in x stays exact."""
    x = torch.ones(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x_in, c_noise = edm_inputs(FlowPath(), x, t, SD)
    torch.testing.assert_close(c_noise, torch.tensor([math.log(S_RANGE[0]), math.log(S_RANGE[1])],
                                                     dtype=torch.float64) / 4)
    torch.testing.assert_close(x_in, torch.stack([x[0] / SD, x[1]]))  # 1/sqrt(sigma^2 + sd^2 alpha^2)
    x0 = Denoiser(RawF(), FlowPath(), "F", precond="edm")(x, t)
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(x0[0], x[0])  # at t = 0 the data is the input: D = x


@pytest.mark.parametrize("name", list(PATHS))
def test_F_is_edms_definition_and_round_trips_at_every_t(name):
    """target F = (x0 - c_skip x~) / c_out (Table 1, networks.py:660-661 at sigma = s/alpha); F -> (x0, x1)
    recovers both in float64, also at t = 0 and at a flow's t = 1 (alpha = 0)."""
    path = PATHS[name]
    x0, x1, t = draws(path)
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    sigma = s / a
    c_skip, c_out = SD**2 / (sigma**2 + SD**2), sigma * SD / (sigma**2 + SD**2).sqrt()
    x_t = path.marginal(x0, x1, t)
    torch.testing.assert_close(target("F", path, x0, x1, t), (x0 - c_skip * x_t / a) / c_out, rtol=1e-10, atol=1e-10)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(4)  # F = -x1 at sigma = 0, x0 / sd at alpha = 0
    for tt, y0, y1 in [(t, x0, x1), (ends, x0[:8], x1[:8])]:
        back = to_x0_x1(target("F", path, y0, y1, tt), "F", path, path.marginal(y0, y1, tt), tt)
        torch.testing.assert_close(back[0], y0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(back[1], y1, rtol=1e-9, atol=1e-9)


def test_loss_is_edm_loss_for_the_same_draws():
    """pair_loss(F, simple, precond edm) and pair_loss(any prediction, weighting edm) = the mean of EDMLoss's
    elementwise loss (loss.py:79; EDM's training loop sums it, a constant factor) for the same y, n, sigma."""
    F, g = RawF(), torch.Generator().manual_seed(3)
    y = torch.randn(256, 3, generator=g, dtype=torch.float64)
    sigma = edm_sigma(torch.randn(256, generator=g, dtype=torch.float64))
    n = torch.randn(256, 3, generator=g, dtype=torch.float64) * sigma[:, None]  # loss.py:77
    reference = edm_loss(lambda x, s: edm_precond(F, x, s[:, 0]), y, n, sigma).mean().item()
    t = EDM.t_from_s(sigma)  # outside [0, 1] where sigma leaves [0.002, 80]: EDM does not clip
    ours = pair_loss(F, EDM, "F", y, n / sigma[:, None], t, "simple", precond="edm").item()
    assert abs(ours - reference) < 1e-10 * reference, (ours, reference)
    for prediction in ("x0", "eps", "score", "velocity", "F"):
        weighted = pair_loss(PredictsFromD(EDM, prediction, F), EDM, prediction, y, n / sigma[:, None], t, "edm")
        assert abs(weighted.item() - reference) < 1e-10 * reference, (prediction, weighted.item(), reference)


@pytest.mark.parametrize("name", ["vp", "subvp", "flow", "flow_uniform"])
def test_F_simple_equals_weighting_edm_on_every_path(name):
    """For the same draws, plain MSE on F (precond edm) = weighting edm on D, whatever the network predicts."""
    path, F = PATHS[name], RawF()
    x0, x1, t = draws(path, n=256, lo=0.02, hi=0.98)
    ours = pair_loss(F, path, "F", x0, x1, t, "simple", precond="edm").item()
    for prediction in ("x0", "velocity", "F") + (("eps",) if path.prior == "gaussian" else ()):
        weighted = pair_loss(PredictsFromD(path, prediction, F), path, prediction, x0, x1, t, "edm").item()
        assert abs(weighted - ours) < 1e-10 * ours, (prediction, weighted, ours)


def test_min_snr_weights_the_x0_error_by_min_snr_gamma():
    """min_snr: mean over examples of min(alpha^2 / sigma^2, gamma) ||x0_hat - x0||^2 / d (Hang et al. 2023)."""
    path, F = PATHS["vp"], RawF()
    x0, x1, t = draws(path, n=256, lo=0.01, hi=0.99)
    x0_hat = edm_D_on(path, F, path.marginal(x0, x1, t), t)
    snr = path.alpha(t) ** 2 / path.sigma(t) ** 2
    assert (snr > 3).any() and (snr < 3).any()  # both sides of gamma = 3 are drawn
    expected = (torch.minimum(snr, torch.tensor(3.0)) * (x0_hat - x0).square().mean(1)).mean().item()
    got = pair_loss(PredictsFromD(path, "eps", F), path, "eps", x0, x1, t, "min_snr", snr_gamma=3.0).item()
    assert abs(got - expected) < 1e-10 * expected


# --- training times ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["edm", "ve", "vp", "subvp", "flow"])
def test_lognormal_draws_are_edms_sigma(name):
    """ln s ~ N(-1.2, 1.2^2) for s = sigma/alpha: the very sigma of loss.py:73-74 for the same normal draws,
    and its mean and standard deviation within sampling error."""
    path, n = PATHS[name], 200_000
    t = path.sample_t(n, torch.Generator().manual_seed(0), "cpu", "lognormal").double()
    z = torch.randn(n, generator=torch.Generator().manual_seed(0))  # loss.py:73's rnd_normal, same stream
    s = path.sigma(t) / path.alpha(t)
    torch.testing.assert_close(s, edm_sigma(z.double()), rtol=2e-5, atol=0)  # t went through float32
    log_s = s.log()
    assert abs(log_s.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(n)
    assert abs(log_s.std().item() - 1.2) < 5 * 1.2 / math.sqrt(2 * n)
    if name in ("edm", "ve"):  # not clipped: below sigma_min the VE path goes on at t < 0
        assert (t < 0).any()
    if name == "flow":  # a flow covers every s > 0 inside (0, 1)
        assert ((t > 0) & (t < 1)).all()


def test_logit_normal_draws():
    """t = sigmoid(u), u ~ N(m, s^2) (Esser et al. 2024, eq. 19): logit(t) has mean m and std s."""
    n = 200_000
    t = FlowPath().sample_t(n, torch.Generator().manual_seed(0), "cpu", "logit_normal", mean=0.5, std=0.8).double()
    u = torch.log(t / (1 - t))
    assert abs(u.mean().item() - 0.5) < 5 * 0.8 / math.sqrt(n)
    assert abs(u.std().item() - 0.8) < 5 * 0.8 / math.sqrt(2 * n)
    torch.testing.assert_close(t.mean(), torch.tensor(0.5, dtype=torch.float64), atol=0.2, rtol=0)


def bisect_t(path, s, iters=64):
    """The t in [0, 1] with sigma(t)/alpha(t) = s by bisection: s grows with t on every path."""
    lo, hi = torch.zeros_like(s), torch.ones_like(s)
    for _ in range(iters):
        mid = (lo + hi) / 2
        later = path.sigma(mid) / path.alpha(mid) < s
        lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("name", ["edm", "ve", "vp", "subvp", "flow"])
def test_t_from_s_inverts_the_path(name):
    """t_from_s against bisection of sigma/alpha on [0, 1] and against the forward map, also beyond [0, 1] where
    the path's formulas extend (VE below sigma_min, VP above s(1))."""
    path = PATHS[name]
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    s = path.sigma(t) / path.alpha(t)
    torch.testing.assert_close(path.t_from_s(s), bisect_t(path, s), rtol=1e-10, atol=1e-12)
    wide = torch.linspace(-0.5, 1.5, 41, dtype=torch.float64) if name in ("edm", "ve") else \
        torch.linspace(1e-3, 1.5 if name != "flow" else 0.999, 41, dtype=torch.float64)
    torch.testing.assert_close(path.t_from_s(path.sigma(wide) / path.alpha(wide)), wide, rtol=1e-10, atol=1e-12)


def test_discrete_paths_refuse_other_times():
    for path in (DDPMPath(T=10), NCSNPath(L=5)):
        for dist in ("lognormal", "logit_normal"):
            with pytest.raises(DiffcliError, match="discrete") as e:
                path.sample_t(4, None, "cpu", dist)
            assert "\n" not in str(e.value)
        assert path.sample_t(4, None, "cpu", "uniform").shape == (4,)
    with pytest.raises(DiffcliError, match="uniform times have neither"):
        check_times("uniform", VPPath(), mean=0.3)


# --- configs, checkpoints, the command line -------------------------------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    (["model=edm", "model.precond=foo"], "model.precond=foo is unknown"),
    (["model=edm", "model.times.dist=foo"], "model.times.dist=foo is unknown"),
    (["model=edm", "model.sigma_data=-1"], "model.sigma_data=-1"),
    (["model=ddpm", "model.times.dist=lognormal"], "discrete"),
])
def test_bad_edm_settings_are_one_line_errors(tmp_path, overrides, fragment):
    r = run_cli("train", "data=moons", "train.steps=1", *overrides, cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr


@pytest.mark.parametrize("overrides, nfe", [
    (["model=edm"], 35),  # Heun, 18 steps, no correction on the last
    (["model=vpsde", "model.precond=edm", "model.prediction=F", "model.times.dist=lognormal"], None),
    (["model=flow", "model.precond=edm", "model.prediction=F", "model.times.dist=logit_normal",
      "model.weighting=min_snr"], None),
])
def test_edm_trains_and_samples(tmp_path, overrides, nfe):
    from diffcli.train import run_train

    run_train(compose_config("train", ["data=moons", "train.steps=30", "train.log_every=10", "train.sample_every=0",
                                       "device=cpu", *overrides]), tmp_path / "run")
    model, out = sample_checkpoint(compose_config("sample", [f"ckpt={tmp_path / 'run'}", "n=16", "device=cpu"]))
    assert torch.isfinite(out.samples).all() and model.denoiser.precond == "edm"
    assert nfe is None or out.nfe == nfe


def test_checkpoints_without_the_new_keys_load_and_sample_as_before(tmp_path):
    """A stored config written before model.precond / sigma_data / times / snr_gamma existed: schema defaults,
    and the same samples as the plain Denoiser(net, path, prediction) of that time."""
    from diffcli.build import build_net, build_path
    from diffcli.checkpoint import save_ema
    from diffcli.sampling import generate, sampler_config, sampler_from_config

    cfg = compose_config("train", ["model=vpsde", "data=moons", "device=cpu"])
    torch.manual_seed(0)
    net = build_net(cfg.net, (2,))
    old = OmegaConf.to_container(cfg, resolve=True)
    for key in ("precond", "sigma_data", "times", "snr_gamma"):
        del old["model"][key]
    save_ema(tmp_path / "ema_0.safetensors", net.state_dict(), OmegaConf.create(old), 0, (2,))
    model, out = sample_checkpoint(compose_config("sample", [f"ckpt={tmp_path / 'ema_0.safetensors'}", "n=32",
                                                             "device=cpu", "steps=20"]))
    d = model.denoiser
    assert (d.precond, d.sigma_data) == ("none", 0.5)
    path = build_path(cfg.model.path)
    sampler, grid = sampler_from_config(sampler_config(compose_config("sample", ["steps=20"]), cfg.model), path)
    before = generate(Denoiser(net.eval(), path, "eps"), sampler, grid, 32, (2,), batch_size=256, seed=0,
                      device=torch.device("cpu")).samples
    assert torch.equal(out.samples, before)


def test_oracle_takes_raw_inputs_under_precond_edm():
    """net=oracle is exact on the path's own (x_t, t): precond edm does not apply; prediction F uses sigma_data."""
    from diffcli.oracle import Oracle

    data = compose_config("train", ["data=eight_gaussians"]).data
    oracle = Oracle((2,), data, EDM, "F", sigma_data=0.3)
    x0, x1, t = draws(EDM, d=2)
    x_t = EDM.marginal(x0, x1, t)
    got = Denoiser(oracle, EDM, "F", precond="edm", sigma_data=0.3)(x_t, t)
    torch.testing.assert_close(got, oracle.x0_hat(x_t, t), rtol=1e-10, atol=1e-10)


def test_edm_loss_runs_on_the_optimal_denoiser_near_its_minimum():
    """denoising_loss with the edm config's pieces end to end (lognormal times, F, precond edm): for Gaussian
    data with EDM's optimal D, the F-MSE is E[Var[x0 | x_t] / c_out^2] (c_out at s), sampled over ln s."""
    m, s0, n, d = 0.5, 0.8, 100_000, 8

    class OptimalF(torch.nn.Module):
        """F* = (E[x0 | x~] - c_skip x~) / c_out, from EDM's inputs (c_in x~, c_noise) alone."""

        def forward(self, x_in, c_noise):
            sigma = torch.exp(4 * c_noise)[:, None]
            x = x_in * (sigma**2 + SD**2).sqrt()
            x0 = m + s0**2 * (x - m) / (s0**2 + sigma**2)
            c_skip, c_out = SD**2 / (sigma**2 + SD**2), sigma * SD / (sigma**2 + SD**2).sqrt()
            return (x0 - c_skip * x) / c_out

    x0 = (m + s0 * torch.randn(n, d, generator=torch.Generator().manual_seed(1))).double()
    times = {"dist": "lognormal"}
    loss = denoising_loss(OptimalF(), EDM, "F", x0, torch.Generator().manual_seed(2), times=times,
                          precond="edm").item()
    sigma = EDM.sigma(EDM.sample_t(n, torch.Generator().manual_seed(2), "cpu", **times).double())  # same draws
    c_out2 = (sigma * SD) ** 2 / (sigma**2 + SD**2)
    expected = s0**2 * sigma**2 / (s0**2 + sigma**2) / c_out2
    standard_error = (expected.square().sum() * 2 / d).sqrt().item() / n  # given t: expected(t) chi^2_d / d
    assert abs(loss - expected.mean().item()) < 5 * standard_error, (loss, expected.mean().item(), standard_error)
