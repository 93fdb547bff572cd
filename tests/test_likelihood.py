"""Log-likelihood through the probability-flow ODE against closed forms: Gaussian and mixture densities (scipy),
the closed-form Gaussian transport, the Hutchinson estimator's own variance, and bits/dim of a uniform model."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from diffcli import DiffcliError
from diffcli.likelihood import bits_per_dim, log_likelihood, prior_log_prob
from diffcli.oracle import Oracle
from diffcli.paths import FlowPath, VPPath
from diffcli.prediction import Denoiser, target

F64 = torch.float64
MU, S = np.array([0.4, -0.3]), np.array([0.5, 0.8])  # 2D data N(MU, diag S^2)
POINTS = torch.tensor([[0.4, -0.3], [1.0, 0.5], [-0.5, -1.2], [0.0, 1.5]], dtype=F64)
MIXTURE = {"means": [[-1.0, 0.5], [1.5, -0.5]], "covs": [[[0.3, 0.1], [0.1, 0.2]], [[0.1, 0.0], [0.0, 0.4]]],
           "weights": [0.7, 0.3]}
MIXTURE_POINTS = torch.tensor([[-1.0, 0.5], [1.5, -0.5], [0.2, 0.0], [2.5, 1.0], [-2.0, -1.0]], dtype=F64)
SHAPE = (3, 4, 4)  # images for the Hutchinson and bits/dim tests, D = 48


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: thread hand-offs cost more than they save (10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def gmm(means, covs, weights):
    return {"name": "gmm", "kind": "toy", "params": {"means": means, "covs": covs, "weights": weights}}


def oracle(path, prediction, data):
    return Denoiser(Oracle((2,), data, path, prediction), path, prediction)


def coefficients(path, t):
    t = torch.tensor(t, dtype=F64)
    return path.alpha(t).item(), path.sigma(t).item()


# ---------------------------------------------------------------------------------------------
# 2D: the exact oracle against scipy


@pytest.mark.parametrize("path, prediction", [(VPPath(), "eps"), (FlowPath(prior="gaussian"), "velocity")],
                         ids=["vp-eps", "flow-velocity"])
def test_gaussian_log_likelihood_matches_scipy(path, prediction):
    """For Gaussian data the probability-flow map is affine: z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)
    is constant along it, so x(1) is known in closed form, and with it the bias of the prior approximation
    N(0, sigma(1)^2 I) against the true p_1 = N(alpha(1) mu, alpha(1)^2 s^2 + sigma(1)^2) (zero for a flow)."""
    data = gmm([MU.tolist()], [np.diag(S**2).tolist()], [1.0])
    log_p = log_likelihood(oracle(path, prediction, data), POINTS)["log_p"].numpy()
    a1, s1 = coefficients(path, 1.0)
    sd1 = np.sqrt(a1**2 * S**2 + s1**2)
    x1 = a1 * MU + sd1 * (POINTS.numpy() - MU) / S
    bias = multivariate_normal(np.zeros(2), s1**2).logpdf(x1) - multivariate_normal(a1 * MU, np.diag(sd1**2)).logpdf(x1)
    truth = multivariate_normal(MU, np.diag(S**2)).logpdf(POINTS.numpy())
    # dopri5 at rtol = atol = 1e-5 lands within ~4e-5 nats here; starting at t_min = 1e-5 instead of 0 moves
    # log p by ~D t_min = 2e-5: 2e-4 leaves room for both
    np.testing.assert_allclose(log_p, truth + bias, atol=2e-4)
    if isinstance(path, VPPath):  # alpha(1) ~ 6.7e-3: the prior approximation is visible, and accounted for
        assert np.abs(bias).max() > 5e-3
    else:
        np.testing.assert_array_equal(bias, 0)


def mixture_log_prob(x, t):
    """log p_t(x) on the flow path x_t = (1 - t) x0 + t x1: sum_k w_k N(x; (1-t) m_k, (1-t)^2 C_k + t^2 I)."""
    density = sum(w * multivariate_normal((1 - t) * np.array(m), (1 - t) ** 2 * np.array(c) + t**2 * np.eye(2)).pdf(x)
                  for m, c, w in zip(*MIXTURE.values()))
    return np.log(density)


def test_mixture_log_likelihood_matches_scipy():
    """A 2-component 2D mixture on the flow path (alpha(1) = 0, so the Gaussian prior term is exact)."""
    path = FlowPath()
    out = log_likelihood(oracle(path, "velocity", gmm(**MIXTURE)), MIXTURE_POINTS, rtol=1e-6, atol=1e-6)
    truth = mixture_log_prob(MIXTURE_POINTS, 0.0)
    # the ODE measures p at t_min = 1e-5: x_t = (1 - t) x0 + t x1 moves log p by ~t_min |x . grad log p|, up to
    # 2.7e-4 at (2.5, 1) in the narrow component's tail; that p_{t_min} is known in closed form too
    assert np.abs(truth - mixture_log_prob(MIXTURE_POINTS, path.eps)).max() > 2e-4
    # the point (0.2, 0) between the modes is the hardest for dopri5: ~1.4e-3 off at rtol 1e-5, ~4e-5 at rtol 1e-6
    np.testing.assert_allclose(out["log_p"].numpy(), mixture_log_prob(MIXTURE_POINTS, path.eps), atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "score", "x0"])
def test_every_prediction_gives_the_same_flow(prediction):
    """The same field in another parameterization gives the same integral and the same solver steps. On a flow
    eps and score divide 0 by 0 at t = 1 (alpha(1) = 0): the field must be read just below t = 1, else
    dopri5 sees garbage there and rejects steps (277 evaluations instead of 121) or fails."""
    data = gmm(**MIXTURE)
    out = log_likelihood(oracle(FlowPath(), prediction, data), MIXTURE_POINTS, rtol=1e-6, atol=1e-6)
    velocity = log_likelihood(oracle(FlowPath(), "velocity", data), MIXTURE_POINTS, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["log_p"], velocity["log_p"], atol=1e-8, rtol=0)
    assert out["nfe"] == velocity["nfe"]


class Float32Only(torch.nn.Module):
    """A float32 net (it has a float32 parameter) that refuses any other input dtype, around an exact oracle."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.one = inner, torch.nn.Parameter(torch.ones((), dtype=torch.float32))

    def forward(self, x, t):
        assert x.dtype == t.dtype == torch.float32
        return self.inner(x.double(), t.double()).float() * self.one


def test_float32_net_gets_float32_input_and_agrees():
    path, data = FlowPath(), gmm([MU.tolist()], [np.diag(S**2).tolist()], [1.0])
    net = Float32Only(Oracle((2,), data, path, "velocity"))
    with torch.no_grad():  # the divergence must still be taken
        log_p = log_likelihood(Denoiser(net, path, "velocity"), POINTS)["log_p"]
    assert log_p.dtype == F64
    exact = log_likelihood(oracle(path, "velocity", data), POINTS)["log_p"]
    torch.testing.assert_close(log_p, exact, atol=1e-4, rtol=0)  # float32 rounding of v: ~1e-7 relative


# ---------------------------------------------------------------------------------------------
# D = 48: a full-covariance Gaussian, exact divergence against Hutchinson


class GaussianNet(torch.nn.Module):
    """The exact prediction for data N(mu, Q diag(lam) Q^T) (flattened): in the eigenbasis y = Q^T (x_t - alpha mu)
    E[x0 | x_t] = mu + Q (alpha lam / (alpha^2 lam + sigma^2) y), E[x1 | x_t] = Q (sigma / (alpha^2 lam + sigma^2) y).
    """

    def __init__(self, path, prediction, mu, q, lam):
        super().__init__()
        self.path, self.prediction, self.mu, self.q, self.lam = path, prediction, mu, q, lam

    def forward(self, x_t, t):
        x, t = x_t.flatten(1).double(), t.double()
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        y, var = (x - a * self.mu) @ self.q, a**2 * self.lam + s**2
        x0, x1 = self.mu + (a * self.lam / var * y) @ self.q.T, (s / var * y) @ self.q.T
        return target(self.prediction, self.path, x0, x1, t).reshape(x_t.shape).to(x_t.dtype)


def gaussian_model(path=None, prediction="x0"):
    """A rotated Gaussian with variances 5e-3 .. 0.5: its Jacobian dv/dx is far from diagonal, so Rademacher
    probes have real variance (for a diagonal Jacobian eps_i^2 = 1 makes Hutchinson exact)."""
    path, d, g = path or FlowPath(), math.prod(SHAPE), gen(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam, mu = 0.5 * torch.logspace(-2, 0, d, dtype=F64), 0.3 * torch.randn(d, generator=g, dtype=F64)
    return Denoiser(GaussianNet(path, prediction, mu, q, lam), path, prediction), mu, q, lam


def marginal_log_prob(denoiser, mu, q, lam, x, t):
    """log p_t(x) = log N(x; alpha mu, Q diag(alpha^2 lam + sigma^2) Q^T): what the ODE started at t measures."""
    a, s = coefficients(denoiser.path, t)
    cov = (q * (a**2 * lam + s**2)) @ q.T
    return torch.from_numpy(multivariate_normal((a * mu).numpy(), cov.numpy()).logpdf(x.flatten(1).numpy()))


def test_hutchinson_matches_exact_within_its_variance():
    """With v affine in x the x-trajectory does not depend on eps, so one probe's estimate is the exact value plus
    eps^T M eps - tr M, M = int dv/dx dt = Q diag(m) Q^T, m = log of each eigen-direction's std ratio; its
    variance is 2 sum_{i != j} M_ij^2 (Rademacher), divided by the number of probes."""
    denoiser, mu, q, lam = gaussian_model()
    x0 = (mu + torch.randn(8, len(mu), generator=gen(1), dtype=F64) * lam.sqrt() @ q.T).reshape(8, *SHAPE)
    t_min, probes = denoiser.path.eps, 16
    exact = log_likelihood(denoiser, x0, exact=True)["log_p"]
    # dopri5 at rtol = atol = 1e-5 over D = 48 dimensions: ~5e-4 nats from the analytic p_{t_min}
    torch.testing.assert_close(exact, marginal_log_prob(denoiser, mu, q, lam, x0, t_min), atol=1e-3, rtol=0)

    hutchinson = log_likelihood(denoiser, x0, probes=probes, generator=gen(2))["log_p"]  # D > 16: Hutchinson
    (a0, s0), (a1, s1) = coefficients(denoiser.path, t_min), coefficients(denoiser.path, 1.0)
    m = 0.5 * torch.log((a1**2 * lam + s1**2) / (a0**2 * lam + s0**2))
    big_m = (q * m) @ q.T
    sd = (2 * ((big_m**2).sum() - (big_m.diagonal() ** 2).sum()) / probes).sqrt()  # ~1.6 nats
    z = (hutchinson - exact) / sd
    assert z.abs().max() < 5  # each estimate within 5 standard deviations (|z| < 5: p ~ 6e-7 per point)
    assert 0.1 < (z**2).mean() < 4  # and the spread is the predicted one (chi^2_8 / 8), neither zero nor larger


def test_hutchinson_probes_are_fixed_by_the_generator():
    denoiser, mu, q, lam = gaussian_model()
    x0 = mu.reshape(1, *SHAPE).expand(2, *SHAPE)
    first, again = (log_likelihood(denoiser, x0, generator=gen(3))["log_p"] for _ in range(2))
    other = log_likelihood(denoiser, x0, generator=gen(4))["log_p"]
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert first[0] != first[1] and (first != other).all()  # samples get their own probes, seeds differ


# ---------------------------------------------------------------------------------------------
# bits/dim


class ZeroVelocity(torch.nn.Module):
    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


def test_bits_per_dim_of_a_uniform_model_is_8():
    """Uniform prior on [-1, 1]^D and a zero velocity: p_z = 2^-D on the whole data space, so 1 + 7 = 8 bits."""
    path = FlowPath(prior="uniform")
    images = torch.randint(0, 256, (8, 3, 8, 8), generator=gen(5), dtype=torch.uint8)
    out = bits_per_dim(Denoiser(ZeroVelocity(), path, "velocity"), images, generator=gen(6))
    torch.testing.assert_close(out["bpd"], torch.full((8,), 8.0, dtype=F64), atol=1e-6, rtol=0)
    assert out["nfe"] > 0


def test_bits_per_dim_of_a_gaussian_model_matches_scipy():
    """bpd = -log2 p_z(z) / D + 7 with z = (x + u) / 128 - 1 redrawn from the same generator seed."""
    denoiser, mu, q, lam = gaussian_model()
    images = torch.randint(0, 256, (4, *SHAPE), generator=gen(7), dtype=torch.uint8)
    # kwargs reach log_likelihood; uniform noise lies far out in the thin directions (-log p ~ 1e3 nats, dominated
    # by |x(1)|^2), so dopri5's relative tolerance sets the error: 1e-7 here keeps it below 1e-3 nats
    out = bits_per_dim(denoiser, images, generator=gen(8), exact=True, rtol=1e-7, atol=1e-7)
    z = (images.double() + torch.rand(images.shape, generator=gen(8), dtype=F64)) / 128 - 1
    assert z.min() >= -1 and z.max() < 1
    log_p = marginal_log_prob(denoiser, mu, q, lam, z, denoiser.path.eps)
    d = math.prod(SHAPE)
    # 1e-3 nats (test above) / (48 ln 2) ~ 3e-5 bits
    torch.testing.assert_close(out["bpd"], -log_p / (d * math.log(2)) + 7, atol=3e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# prior term and bad input


def test_prior_log_prob():
    x = torch.tensor([[0.3, -0.9], [0.5, 1.2]], dtype=F64)
    s1 = coefficients(VPPath(), 1.0)[1]
    truth = multivariate_normal(np.zeros(2), s1**2).logpdf(x.numpy())
    torch.testing.assert_close(prior_log_prob(VPPath(), x), torch.from_numpy(truth))
    uniform = prior_log_prob(FlowPath(prior="uniform"), x.reshape(2, 1, 2))  # any (B, ...) shape
    torch.testing.assert_close(uniform, torch.tensor([-2 * math.log(2), -math.inf], dtype=F64))


@pytest.mark.parametrize("call, match", [
    (lambda d: bits_per_dim(d, torch.zeros(2, 3, 4, 4), generator=gen()), "uint8"),
    (lambda d: log_likelihood(d, torch.zeros(2, 48), probes=0), "probes=0"),
    (lambda d: log_likelihood(d, torch.zeros(2, 48), probes=1.5), "probes=1.5"),
    (lambda d: log_likelihood(d, torch.zeros(2, 48), t_min=0.0), "t_min"),
    (lambda d: log_likelihood(d, torch.zeros(48)), r"\(B, \.\.\.\)"),
    (lambda d: log_likelihood(d, torch.zeros(2, 48, dtype=torch.uint8)), "float"),
], ids=["float-images", "no-probes", "fractional-probes", "t_min", "no-batch", "int-x0"])
def test_bad_input_is_a_one_line_error(call, match):
    with pytest.raises(DiffcliError, match=match) as error:
        call(gaussian_model()[0])
    assert "\n" not in str(error.value)


def test_unknown_prior_is_refused():
    path = FlowPath()
    path.prior = "laplace"
    with pytest.raises(DiffcliError, match="laplace"):
        prior_log_prob(path, torch.zeros(1, 2))
