"""Every formulation's path against closed forms, its predictions, and its loss at the exact optimum."""

import itertools
import math

import pytest
import torch

from diffcli import DiffcliError
from diffcli.losses import check_weighting, denoising_loss, ot_coupling
from diffcli.paths import DDPMPath, FlowPath, NCSNPath, SubVPPath, VEPath, VPPath
from diffcli.prediction import COEFFICIENTS, check_prediction, convert, target

B_MIN, B_MAX, S_MIN, S_MAX = 0.1, 20.0, 0.01, 50.0
PATHS = {
    "ve": VEPath(S_MIN, S_MAX), "ncsn": NCSNPath(S_MIN, 5.0, L=10), "vp": VPPath(B_MIN, B_MAX),
    "subvp": SubVPPath(B_MIN, B_MAX), "flow": FlowPath(), "flow_uniform": FlowPath(prior="uniform"),
    "ddpm": DDPMPath(T=1000), "edm": VEPath(0.002, 80.0),
}


def times(n=100, lo=0.02, hi=0.97):
    return torch.linspace(lo, hi, n, dtype=torch.float64) + 1e-4  # off DDPM's grid points


def integral_beta(t):
    return B_MIN * t + (B_MAX - B_MIN) * t**2 / 2


# g(t)^2 of each SDE in closed form, written from the papers rather than from the path's alpha, sigma
CLOSED_G2 = {
    "ve": lambda t: 2 * math.log(S_MAX / S_MIN) * (S_MIN * (S_MAX / S_MIN) ** t) ** 2,  # d sigma^2 / dt
    "vp": lambda t: B_MIN + t * (B_MAX - B_MIN),  # beta(t)
    "subvp": lambda t: (B_MIN + t * (B_MAX - B_MIN)) * (1 - torch.exp(-2 * integral_beta(t))),  # score-SDE eq. 34
    "flow": lambda t: 2 * t / (1 - t),  # 2 sigma sigma' - 2 (alpha'/alpha) sigma^2 with alpha = 1 - t, sigma = t
}


@pytest.mark.parametrize("name", list(PATHS))
def test_derivatives_match_autograd(name):
    path, t = PATHS[name], times().requires_grad_(True)
    for fn, d_fn in [(path.alpha, path.d_alpha), (path.sigma, path.d_sigma)]:
        value = fn(t)
        grad = torch.autograd.grad(value.sum(), t)[0] if value.requires_grad else torch.zeros_like(t)  # alpha = 1
        torch.testing.assert_close(d_fn(t.detach()), grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(CLOSED_G2))
def test_diffusion_matches_closed_form(name):
    t = times()
    torch.testing.assert_close(PATHS[name].g2(t), CLOSED_G2[name](t), rtol=1e-9, atol=1e-12)


def test_vp_drift_and_alpha_closed_form():
    t = times()
    torch.testing.assert_close(PATHS["vp"].f(t), -0.5 * CLOSED_G2["vp"](t))
    torch.testing.assert_close(PATHS["vp"].alpha(t), torch.exp(-0.5 * integral_beta(t)))
    torch.testing.assert_close(PATHS["vp"].alpha(t) ** 2 + PATHS["vp"].sigma(t) ** 2, torch.ones_like(t))


@pytest.mark.parametrize("name", list(PATHS))
def test_marginal_by_sampling(name):
    """x0 ~ N(m, s^2): x_t has mean alpha m and variance alpha^2 s^2 + sigma^2 Var(x1)."""
    path, g, n, m, s = PATHS[name], torch.Generator().manual_seed(0), 200_000, 0.7, 0.4
    prior_var = 1 / 3 if path.prior == "uniform" else 1.0
    for t_val in (0.1, 0.5, 0.9):
        t = torch.full((n,), t_val, dtype=torch.float64)
        x0 = m + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
        x1 = path.sample_prior((n, 1), g, "cpu").double()
        x_t = path.marginal(x0, x1, t)
        a, sig = path.alpha(t[:1]).item(), path.sigma(t[:1]).item()
        var = a**2 * s**2 + sig**2 * prior_var
        assert x_t.mean().item() == pytest.approx(a * m, abs=5 * math.sqrt(var / n))
        assert x_t.var().item() == pytest.approx(var, rel=0.02)


def test_ncsn_levels_are_geometric_and_sampled_uniformly():
    path = NCSNPath(sigma_min=0.01, sigma_max=1.0, L=10)
    sigmas = path.sigma(path.levels.flip(0))  # sigma_1 > ... > sigma_L
    torch.testing.assert_close(sigmas, torch.tensor([0.01 ** (i / 9) for i in range(10)], dtype=torch.float64))
    t = path.sample_t(50_000, torch.Generator().manual_seed(0), "cpu")
    counts = torch.bincount((t * 9).round().long(), minlength=10)
    assert set((t * 9).round().tolist()) == set(range(10)) and counts.min() > 0.9 * 5000


def test_continuous_times_are_uniform_on_eps_one():
    path = VPPath(eps=0.2)
    t = path.sample_t(100_000, torch.Generator().manual_seed(0), "cpu")
    assert t.min() >= 0.2 and t.max() <= 1 and t.mean().item() == pytest.approx(0.6, abs=0.005)


def valid_predictions(path):
    return [p for p in COEFFICIENTS if _valid(p, path)]


def _valid(prediction, path):
    try:
        check_prediction(prediction, path)
        return True
    except DiffcliError:
        return False


@pytest.mark.parametrize("name", list(PATHS))
def test_every_valid_pair_round_trips_in_float64(name):
    path, g = PATHS[name], torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, generator=g, dtype=torch.float64)
    x1 = path.sample_prior((8, 3), g, "cpu").double()
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_t = path.marginal(x0, x1, t)
    for source, dest in itertools.permutations(valid_predictions(path), 2):
        there = convert(target(source, path, x0, x1, t), source, dest, path, x_t, t)
        torch.testing.assert_close(there, target(dest, path, x0, x1, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction, path, fragment", [
    ("v", PATHS["ve"], "variance-preserving"), ("v", PATHS["subvp"], "variance-preserving"),
    ("v", PATHS["flow"], "variance-preserving"), ("eps", PATHS["flow_uniform"], "Gaussian prior"),
    ("score", PATHS["flow_uniform"], "Gaussian prior")])
def test_undefined_predictions_are_one_line_errors(prediction, path, fragment):
    with pytest.raises(DiffcliError, match=fragment) as e:
        check_prediction(prediction, path)
    assert "\n" not in str(e.value) and "use one of" in str(e.value)


def test_score_weightings_need_a_gaussian_prior():
    with pytest.raises(DiffcliError, match="Gaussian prior"):
        check_weighting("sigma2", PATHS["flow_uniform"])
    assert check_weighting("simple", PATHS["flow_uniform"]) == "simple"


@pytest.mark.parametrize("make, fragment", [
    (lambda: VEPath(sigma_min=1.0, sigma_max=0.5), "sigma_min"), (lambda: VPPath(beta_min=5, beta_max=1), "beta_min"),
    (lambda: NCSNPath(L=1), "L=1"), (lambda: VPPath(eps=0.0), "eps"), (lambda: VEPath(eps=1.5), "eps"),
    (lambda: FlowPath(prior="laplace"), "prior"), (lambda: VEPath(sigma_max=None), "sigma_max")])
def test_bad_path_settings(make, fragment):
    with pytest.raises(DiffcliError, match=fragment) as e:
        make()
    assert "\n" not in str(e.value)


# --- the loss at its exact optimum, for Gaussian data x0 ~ N(m, s0^2 I) and the Gaussian prior -------------
# Given x_t, x0 is Gaussian with variance v = s0^2 sigma^2 / (alpha^2 s0^2 + sigma^2), and every target
# c0 x0 + c1 x1 = (c0 - c1 alpha / sigma) x0 + (function of x_t): its conditional variance is
# (c0 - c1 alpha / sigma)^2 v. Written out per target:
M, S0, SD, GAMMA = 0.5, 0.8, 0.5, 5.0  # SD: sigma_data, GAMMA: min-SNR's gamma (the defaults)


def posterior_var(a, s):
    return S0**2 * s**2 / (a**2 * S0**2 + s**2)


def edm_c_out(a, s):
    """c_out = sigma sd / sqrt(sigma^2 + sd^2) at EDM's sigma = s/a (Karras et al. 2022, Table 1)."""
    return (s / a) * SD / ((s / a) ** 2 + SD**2).sqrt()


MIN_CONDITIONAL_VAR = {  # (a, s, da, ds) -> Var[target | x_t]
    "eps": lambda a, s, da, ds: a**2 * S0**2 / (a**2 * S0**2 + s**2),
    "x0": lambda a, s, da, ds: posterior_var(a, s),
    "v": lambda a, s, da, ds: (a**2 + s**2) ** 2 * S0**2 / (a**2 * S0**2 + s**2),
    "velocity": lambda a, s, da, ds: (da - ds * a / s) ** 2 * posterior_var(a, s),
    "score": lambda a, s, da, ds: (a / s**2) ** 2 * posterior_var(a, s),
    # F = (x0 - c_skip x~) / c_out with x~ = x_t / a fixed given x_t
    "F": lambda a, s, da, ds: posterior_var(a, s) / edm_c_out(a, s) ** 2,
}

# weighting -> lambda(t) on the x0 error, from the papers
X0_WEIGHTS = {
    "edm": lambda a, s: ((s / a) ** 2 + SD**2) / ((s / a) * SD) ** 2,  # NVlabs/edm training/loss.py:75, sigma = s/a
    "min_snr": lambda a, s: torch.clamp(a**2 / s**2, max=GAMMA),  # Hang et al. 2023
}


class OptimalNet(torch.nn.Module):
    """E[target | x_t] for Gaussian data: E[x0 | x_t] = m + alpha s0^2 (x_t - alpha m) / (alpha^2 s0^2 + sigma^2)."""

    def __init__(self, path, prediction):
        super().__init__()
        self.path, self.prediction = path, prediction

    def forward(self, x_t, t):
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        x0 = M + a * S0**2 * (x_t - a * M) / (a**2 * S0**2 + s**2)
        return target(self.prediction, self.path, x0, (x_t - a * x0) / s, t)


CASES = [(name, pred, w, "uniform") for name in ("ve", "vp", "subvp", "flow", "ddpm", "ncsn") for pred in COEFFICIENTS
         for w in ("simple", "sigma2", "likelihood", "edm", "min_snr") if _valid(pred, PATHS[name]) and not (
             name == "flow" and w == "likelihood")  # g^2 = 2t/(1-t) has infinite mean on U(eps, 1)
         and (w not in X0_WEIGHTS or pred in ("F", "velocity"))]  # x0 errors: two predictions suffice
CASES += [("edm", "F", "simple", "lognormal"), ("edm", "eps", "edm", "lognormal"), ("edm", "x0", "min_snr", "lognormal"),
          ("vp", "F", "simple", "lognormal"), ("subvp", "velocity", "edm", "lognormal"),
          ("flow", "velocity", "simple", "logit_normal"), ("flow", "F", "edm", "logit_normal"),
          ("flow", "F", "simple", "lognormal")]


@pytest.mark.parametrize("name, prediction, weighting, times", CASES, ids=["-".join(c) for c in CASES])
def test_loss_at_the_optimum_equals_its_analytic_minimum(name, prediction, weighting, times):
    torch.manual_seed(0)
    path, n, d = PATHS[name], 200_000, 16
    g = torch.Generator().manual_seed(1)
    x0 = (M + S0 * torch.randn(n, d, generator=g)).double()
    loss = denoising_loss(OptimalNet(path, prediction), path, prediction, x0, torch.Generator().manual_seed(2),
                          weighting=weighting, times={"dist": times}).item()
    t = path.sample_t(n, torch.Generator().manual_seed(2), "cpu", times).double()  # the same times the loss drew
    a, s, da, ds = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
    if weighting == "simple":
        expected = MIN_CONDITIONAL_VAR[prediction](a, s, da, ds)
    elif weighting in X0_WEIGHTS:
        expected = X0_WEIGHTS[weighting](a, s) * MIN_CONDITIONAL_VAR["x0"](a, s, da, ds)
    else:
        lam = s**2 if weighting == "sigma2" else path.g2(t)
        expected = lam * MIN_CONDITIONAL_VAR["score"](a, s, da, ds)
    # the times are shared, so what is left is the residuals' noise: given t, the per-example loss is
    # expected(t) * chi^2_d / d, of variance expected(t)^2 * 2 / d
    standard_error = (expected.square().sum() * 2 / d).sqrt().item() / n
    assert abs(loss - expected.mean().item()) < 5 * standard_error + 1e-6 * abs(loss), (loss, expected.mean().item())
    assert standard_error < 0.1 * expected.mean().item()  # sharp enough to catch a wrong target (score-space
    # MSE under uniform t is heavy-tailed: 1 / sigma^2 near t = eps; elsewhere the error is well under 1%)


def test_ot_coupling_is_the_exact_assignment():
    """Against brute force over all 7! pairings: the same total squared distance."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(7, 2, generator=g), torch.randn(7, 2, generator=g)
    paired = ot_coupling(x0, x1)
    best = min(sum(((x0[i] - x1[j]) ** 2).sum().item() for i, j in enumerate(p))
               for p in itertools.permutations(range(7)))
    assert ((x0 - paired) ** 2).sum().item() == pytest.approx(best, rel=1e-6)
    assert sorted(paired.tolist()) == sorted(x1.tolist())  # a permutation of the same prior samples
