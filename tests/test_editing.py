"""Editing (diffcli/editing.py) against exact answers: the Gaussian-mixture posterior against importance weighting,
inpainting by replacement and SDEdit on the exact oracle, whose posteriors are known in closed form."""

import math
from functools import partial

import pytest
import torch
from scipy import stats

from diffcli import DiffcliError
from diffcli.toys import gmm_mixture
from diffcli.editing import from_time, gmm_posterior, inpaint, sdedit
from diffcli.oracle import Oracle
from diffcli.paths import VPPath
from diffcli.prediction import Denoiser
from diffcli.samplers import ddim, euler_maruyama, uniform_grid

GMM = {"means": [[-1.0, 0.5], [1.5, -0.5], [0.0, -1.5]],
       "covs": [[[0.3, 0.15], [0.15, 0.2]], [[0.1, -0.06], [-0.06, 0.25]], [[0.4, 0.1], [0.1, 0.08]]],
       "weights": [0.5, 0.3, 0.2]}
ONE_DIAGONAL = {"means": [[0.7, -0.4]], "covs": [[[0.3, 0.0], [0.0, 0.05]]], "weights": [1.0]}


def oracle(params, path=None):
    """The exact denoiser of a gmm toy on a VP path (eps prediction), float64."""
    path = path or VPPath()
    net = Oracle((2,), {"kind": "toy", "name": "gmm", "params": params}, path, "eps")
    return Denoiser(net, path, "eps", "none", 0.5)


def draw_gmm(params, n, seed=0):
    """n draws of the mixture and their components."""
    means, covs, w = gmm_mixture(**params)
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(w, n, replacement=True, generator=g)
    chol = torch.linalg.cholesky(covs)
    return means[k] + (chol[k] @ torch.randn(n, 2, 1, dtype=torch.float64, generator=g))[..., 0], k


@pytest.mark.parametrize("A, y, sigma_y", [([[1.0, 0.0]], [0.3], 0.4), ([[1.0, 1.0]], [-0.8], 0.2),
                                           ([[1.0, 0.0], [0.0, 1.0]], [0.9, -0.2], 0.5)],
                         ids=["first coordinate", "sum of both", "both, noisy"])
def test_gmm_posterior_equals_importance_weighting(A, y, sigma_y):
    """Weights, mean and second moments of the closed form against 10^6 prior draws weighted by N(y; A x, sigma_y^2),
    each within 3 standard errors of the self-normalised estimate."""
    means, covs, w = gmm_mixture(**GMM)
    A, y = torch.tensor(A, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    log_w, m, S = gmm_posterior(means, covs, w.log(), A, y, sigma_y)
    x, k = draw_gmm(GMM, 10**6)
    weights = torch.softmax(-((y - x @ A.T) ** 2).sum(1) / (2 * sigma_y**2), 0)

    def estimate(f):  # self-normalised importance estimate of E[f] and its standard error
        mean = weights @ f
        return mean, (weights**2 @ (f - mean) ** 2).sqrt()

    pi = log_w.exp()
    exact = {"P(k=0)": pi[0], "P(k=1)": pi[1], "E[x0]": pi @ m[:, 0], "E[x1]": pi @ m[:, 1],
             "E[x0^2]": pi @ (S[:, 0, 0] + m[:, 0] ** 2), "E[x0 x1]": pi @ (S[:, 0, 1] + m[:, 0] * m[:, 1])}
    f = {"P(k=0)": (k == 0).double(), "P(k=1)": (k == 1).double(), "E[x0]": x[:, 0], "E[x1]": x[:, 1],
         "E[x0^2]": x[:, 0] ** 2, "E[x0 x1]": x[:, 0] * x[:, 1]}
    for name, value in exact.items():
        mean, se = estimate(f[name])
        assert abs(mean - value) < 3 * se, (name, mean.item(), value.item(), se.item())


def test_gmm_posterior_without_noise_fixes_the_observed_coordinate():
    """sigma_y = 0 and A picking coordinate 0: every component's mean has x0 = y and no variance left there."""
    means, covs, w = gmm_mixture(**GMM)
    _, m, S = gmm_posterior(means, covs, w.log(), torch.tensor([[1.0, 0.0]]), torch.tensor([0.25]), 0.0)
    assert torch.allclose(m[:, 0], torch.full((3,), 0.25, dtype=torch.float64), atol=1e-12)
    assert S[:, 0, :].abs().max() < 1e-12 and (S[:, 1, 1] > 0).all()


def test_inpainting_by_replacement_samples_the_exact_posterior_of_independent_coordinates():
    """One Gaussian with a diagonal covariance: given x[0], x[1] keeps its prior N(-0.4, 0.05). Replacement with
    DDIM (400 steps: at 100 the spread of x[1] is 5% short, DDIM's own error, which 4000 draws see) on the exact
    oracle passes a KS test against it, and the known coordinate is kept exactly."""
    denoiser = oracle(ONE_DIAGONAL)
    n = 4000
    x_known = torch.zeros(n, 2, dtype=torch.float64)
    x_known[:, 0] = 1.1
    mask = torch.tensor([True, False])
    g = torch.Generator().manual_seed(0)
    out = inpaint(ddim, denoiser, x_known, mask, uniform_grid(denoiser.path, 400), g)
    assert torch.equal(out[:, 0], x_known[:, 0])
    p = stats.kstest(out[:, 1].numpy(), stats.norm(-0.4, math.sqrt(0.05)).cdf).pvalue
    assert p > 0.01, p


def test_inpainting_with_nothing_or_everything_known():
    """An all-true mask returns the input; an all-false mask is an ordinary sample of the same seed."""
    denoiser, grid = oracle(GMM), uniform_grid(VPPath(), 20)
    x, _ = draw_gmm(GMM, 64, seed=3)
    out = inpaint(ddim, denoiser, x, torch.ones(2, dtype=torch.bool), grid, torch.Generator().manual_seed(1))
    assert torch.equal(out, x)
    out = inpaint(ddim, denoiser, x, torch.zeros(2, dtype=torch.bool), grid, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(x.shape, generator=g, dtype=torch.float64)  # sampling starts at sigma(t_0) x1, as `sample` does
    plain = ddim(denoiser, denoiser.path, denoiser.path.sigma(grid[0]) * x1, grid, generator=g)
    assert torch.equal(out, plain)


def test_a_mask_of_another_shape_is_one_line():
    with pytest.raises(DiffcliError, match=r"the mask has shape \(3,\), the input \(2,\)"):
        inpaint(ddim, oracle(GMM), torch.zeros(4, 2, dtype=torch.float64), torch.ones(3, dtype=torch.bool),
                uniform_grid(VPPath(), 5))


def test_sdedit_from_a_fixed_point_lands_on_the_posterior_mean():
    """Chains of the reverse SDE (Euler-Maruyama, 200 steps) from one x_t0 at t0 = 0.5: their mean equals the exact
    E[x0 | x_t0] of the mixture within 3 standard errors (the SDE's chains sample p(x0 | x_t0))."""
    denoiser = oracle(GMM)
    n, t0 = 10_000, 0.5
    x_t0 = torch.tensor([[0.4, -0.3]], dtype=torch.float64).expand(n, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    grid = from_time(uniform_grid(denoiser.path, 400), t0)
    out = euler_maruyama(denoiser, denoiser.path, x_t0, grid, generator=g)
    exact = denoiser.net.x0_hat(x_t0[:1], torch.tensor([t0], dtype=torch.float64))[0]
    se = out.std(0) / math.sqrt(n)
    assert ((out.mean(0) - exact).abs() < 3 * se).all(), (out.mean(0), exact, se)


def test_sdedit_strength_zero_returns_the_input_and_one_starts_from_noise():
    denoiser, grid = oracle(GMM), uniform_grid(VPPath(), 20)
    x, _ = draw_gmm(GMM, 16)
    assert torch.equal(sdedit(ddim, denoiser, x, 0.0, grid), x)
    assert from_time(grid, 1.0).tolist() == [1.0, *grid[1:].tolist()]
    with pytest.raises(DiffcliError, match=r"strength=1.5 must lie in \[0, 1\]"):
        sdedit(ddim, denoiser, x, 1.5, grid)


def _sqrtm(C):
    """The symmetric square root of symmetric positive definite matrices."""
    w, V = torch.linalg.eigh(C)
    return V @ torch.diag_embed(w.sqrt()) @ V.mT


def gaussian_flow():
    """The exact flow (velocity prediction) of data N(mu, S) with a full covariance, 64 draws x0, mu and S."""
    from diffcli.paths import FlowPath

    params = {"means": [[0.7, -0.4]], "covs": [[[0.3, 0.12], [0.12, 0.2]]], "weights": [1.0]}
    path = FlowPath()
    denoiser = Denoiser(Oracle((2,), {"kind": "toy", "name": "gmm", "params": params}, path, "velocity"), path,
                        "velocity", "none", 0.5)
    mu, S = torch.tensor(params["means"][0], dtype=torch.float64), torch.tensor(params["covs"][0], dtype=torch.float64)
    return denoiser, draw_gmm(params, 64)[0], mu, S


def test_encoding_a_gaussian_equals_the_closed_form_flow_map():
    """For data N(mu, S) the marginals are N(a mu, C_t), C_t = a^2 S + s^2 I, and the probability-flow map from
    t = 0 is linear: x_t = a mu + C_t^(1/2) S^(-1/2) (x0 - mu). dopri5 at tolerance 1e-10 equals it to 1e-6, on a flow
    path (smooth at t = 0) with a full covariance; decoding returns x0."""
    from diffcli.editing import decode, encode

    denoiser, x0, mu, S = gaussian_flow()
    for t in (0.5, 0.999):
        a, s = 1 - t, t
        exact = a * mu + (x0 - mu) @ (_sqrtm(a**2 * S + s**2 * torch.eye(2, dtype=torch.float64))
                                      @ torch.linalg.inv(_sqrtm(S))).mT
        x_t = encode(denoiser, x0, t, rtol=1e-10, atol=1e-10)
        assert (x_t - exact).abs().max() < 1e-6, (t, (x_t - exact).abs().max().item())
        assert (decode(denoiser, x_t, t, rtol=1e-10, atol=1e-10) - x0).abs().max() < 1e-6


def test_fixed_step_inversion_up_to_a_flows_prior_equals_the_closed_form_flow_map():
    """ode_encode up a flow's grid to t = 1, where alpha = 0 (the last step is then sigma x1_hat, DDIM's limit),
    against the closed-form map of a Gaussian from t_min: x_1 = a_1 mu + C_1^(1/2) C_min^(-1/2) (x - a_min mu),
    C_t = a_t^2 S + s_t^2 I. Euler and DDIM (eta = 0) converge at order 1, Heun at order 2, and the dopri5 sampler
    (tolerance 1e-7) lands on it."""
    from functools import partial

    from diffcli.editing import ode_encode
    from diffcli.samplers import dopri5, euler, heun

    denoiser, x0, mu, S = gaussian_flow()
    path = denoiser.path
    C = lambda t: (1 - t) ** 2 * S + t**2 * torch.eye(2, dtype=torch.float64)  # noqa: E731
    t_min = 1e-3
    x = (1 - t_min) * x0 + t_min * torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = (x - (1 - t_min) * mu) @ (_sqrtm(C(1.0)) @ torch.linalg.inv(_sqrtm(C(t_min)))).mT
    err = lambda sampler, steps: (ode_encode(sampler, denoiser, x, uniform_grid(path, steps, t_min)) - exact  # noqa: E731
                                  ).abs().max().item()
    for sampler, order in ((euler, 1), (partial(ddim, eta=0.0), 1), (heun, 2)):
        coarse, fine = err(sampler, 40), err(sampler, 80)
        assert 0.7 * order < math.log2(coarse / fine) < 1.5 * order, (sampler, coarse, fine)
    assert err(partial(dopri5, rtol=1e-7, atol=1e-7), 10) < 1e-4


def test_an_encode_decode_round_trip_of_a_mixture_returns_the_data():
    """The three-component mixture on the VP path, encoded from t = 1e-3 (where the VP sigma is smooth) to 1 and
    decoded back: the points return to 1e-5."""
    from diffcli.editing import pf_ode

    denoiser = oracle(GMM)
    x, _ = draw_gmm(GMM, 256, seed=5)
    noise = pf_ode(denoiser, x, 1e-3, 1.0, rtol=1e-9, atol=1e-9)
    back = pf_ode(denoiser, noise, 1.0, 1e-3, rtol=1e-9, atol=1e-9)
    assert (back - x).abs().max() < 1e-5, (back - x).abs().max().item()


def test_slerp_equals_the_ddim_papers_formula_and_keeps_the_norm():
    """ermongroup/ddim, runners/diffusion.py, Diffusion.sample_interpolation's slerp:
    sin((1 - a) theta) / sin(theta) z1 + sin(a theta) / sin(theta) z2, theta = acos(<z1, z2> / (|z1| |z2|)), per sample
    here; the ends are the inputs; between orthogonal vectors of equal norm the norm stays; parallel inputs fall back
    to the straight line."""
    from diffcli.editing import slerp

    g = torch.Generator().manual_seed(0)
    z0, z1 = (torch.randn(5, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for w in (0.0, 0.3, 1.0):
        out = slerp(z0, z1, w)
        for i in range(5):
            a, b = z0[i], z1[i]
            theta = torch.acos(torch.sum(a * b) / (torch.norm(a) * torch.norm(b)))
            ref = torch.sin((1 - w) * theta) / torch.sin(theta) * a + torch.sin(w * theta) / torch.sin(theta) * b
            assert torch.allclose(out[i], ref, atol=1e-12, rtol=0)
    e0, e1 = torch.tensor([[2.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(slerp(e0, e1, 0.5), torch.tensor([[math.sqrt(2), math.sqrt(2)]], dtype=torch.float64))
    assert torch.allclose(slerp(e0, 3 * e0, 0.5), 2 * e0)


def test_interpolation_ends_at_its_inputs():
    """interpolate at weights 0 and 1 returns the two inputs (a round trip of the PF-ODE, to 1e-5); between them
    the points are other points of the mixture's support (finite, inside the data's range)."""
    from diffcli.editing import interpolate
    from diffcli.paths import FlowPath

    path = FlowPath()
    denoiser = Denoiser(Oracle((2,), {"kind": "toy", "name": "gmm", "params": GMM}, path, "velocity"), path,
                        "velocity", "none", 0.5)
    (x_a, _), (x_b, _) = draw_gmm(GMM, 16, seed=1), draw_gmm(GMM, 16, seed=2)
    out = interpolate(denoiser, x_a, x_b, [0.0, 0.5, 1.0], t=0.999, rtol=1e-9, atol=1e-9)
    assert (out[0] - x_a).abs().max() < 1e-5 and (out[2] - x_b).abs().max() < 1e-5
    assert torch.isfinite(out[1]).all() and out[1].abs().max() < 6


def test_the_colour_basis_is_score_sdes_and_orthonormal():
    """score_sde, controllable_generation.py, get_pc_colorizer: M (float32 there); ours is the exact matrix."""
    from diffcli.editing import LUMA_BASIS

    M = torch.tensor([[5.7735014e-01, -8.1649649e-01, 4.7008697e-08],
                      [5.7735026e-01, 4.0824834e-01, 7.0710671e-01],
                      [5.7735026e-01, 4.0824822e-01, -7.0710683e-01]], dtype=torch.float64)
    assert (LUMA_BASIS - M).abs().max() < 2e-7
    assert (LUMA_BASIS.T @ LUMA_BASIS - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-15


def test_colorizing_keeps_the_luminance_exactly(tmp_path):
    """Three RGB 'images' (1x1) of distinct luminance and the exact point-set oracle: colorizing each one's gray
    (DDIM, 200 steps) keeps that luminance to 1e-12. Replacement does not find the one point of that luminance here:
    where colour depends on luminance it is biased (it gave a point's colour on another's luminance), which is what
    RePaint's resampling is for (issue 28, still to do)."""
    import numpy as np

    from diffcli.editing import LUMA_BASIS, colorize

    images = np.array([[[[200, 30, 30]]], [[[30, 120, 30]]], [[[30, 30, 60]]]], dtype=np.uint8)  # (N, H, W, C)
    np.savez(tmp_path / "rgb.npz", images=images)
    path = VPPath()
    net = Oracle((3, 1, 1), {"kind": "npz", "name": "rgb", "path": str(tmp_path / "rgb.npz")}, path, "eps")
    denoiser = Denoiser(net, path, "eps", "none", 0.5)
    points = torch.from_numpy(images).double().permute(0, 3, 1, 2) / 127.5 - 1  # (3, 3, 1, 1)
    gray = points.mean(1, keepdim=True).repeat_interleave(64, 0)  # 64 copies of each point's gray, (192, 1, 1, 1)
    out = colorize(ddim, denoiser, gray, uniform_grid(path, 200), torch.Generator().manual_seed(0))
    luma = lambda x: torch.einsum("bi...,ij->bj...", x, LUMA_BASIS)[:, 0]  # noqa: E731
    assert (luma(out) - luma(gray.expand(-1, 3, 1, 1))).abs().max() < 1e-12 and torch.isfinite(out).all()
    with pytest.raises(DiffcliError, match="gray images of 1 or 3 channels, got 2"):
        colorize(ddim, denoiser, torch.zeros(1, 2, 1, 1, dtype=torch.float64), uniform_grid(path, 5))


# ---------------------------------------------------------------------------------------------
# RePaint against diffusers' RePaintScheduler and pipeline loop; DPS against the DPS reference's sampling loop


class FakeEpsNet(torch.nn.Module):
    """A fixed, nonlinear 'network', so that both implementations see the same model outputs."""

    def forward(self, x, t):
        return torch.tanh(x) * (0.5 + t.reshape(-1, 1, 1, 1)) + 0.1 * torch.sin(3 * x)


class Queue:
    """Stands in for a noise source: hands out the given tensors in order."""

    def __init__(self, noises):
        self.noises = list(noises)

    def __call__(self, *args, **kwargs):
        return self.noises.pop(0).clone()


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [(250, 10, 10), (50, 10, 10), (37, 5, 3), (20, 1, 2),
                                                               (10, 10, 10), (30, 3, 1)])
def test_repaint_walk_is_diffusers_jump_schedule(steps, jump_length, jump_n_sample):
    """diffusers' RePaintScheduler.set_timesteps: after the move at its index t our state is grid position
    steps - t (t = steps - 1: the first step down from the prior)."""
    from diffusers import RePaintScheduler

    from diffcli.editing import repaint_walk

    ref = RePaintScheduler(num_train_timesteps=steps)
    ref.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    assert repaint_walk(steps, jump_length, jump_n_sample) == [0, *(steps - ref.timesteps).tolist()]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_repaint_equals_diffusers_repaint_on_the_same_noise(monkeypatch, eta):
    """DDIM steps (eta as diffusers' RePaintScheduler's) over the DDPM path, T = 30 and every step taken, jumps of
    3 resampled 3 times, x0_hat unclipped: equal to diffusers' RePaintScheduler driven as pipeline_repaint.py's loop drives it (step
    below t_last, undo_step otherwise), in float64 on the same noises, to 1e-10. diffusers draws one noise per step
    for both the unknown part's variance and the known part; ours draws them apart, so our queue repeats it."""
    from diffusers import RePaintScheduler

    import diffcli.editing as editing
    import diffcli.samplers.sde as sde
    from diffcli.editing import repaint, repaint_walk
    from diffcli.paths import DDPMPath

    T, jl, r = 30, 3, 3
    path = DDPMPath(T=T)
    denoiser = Denoiser(FakeEpsNet(), path, "eps", "none", 0.5)
    g = torch.Generator().manual_seed(0)
    known = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.rand(1, 4, 4, generator=g) < 0.5
    ref = RePaintScheduler(num_train_timesteps=T, eta=eta, clip_sample=False)
    ref.alphas_cumprod, ref.betas = torch.exp(path.log_alpha_bar[1:]), path.betas  # the same float64 tables
    ref.set_timesteps(T, jump_length=jl, jump_n_sample=r)
    noises = [torch.randn(known.shape, generator=g, dtype=torch.float64) for _ in range(len(ref.timesteps) + 1)]

    monkeypatch.setattr("diffusers.schedulers.scheduling_repaint.randn_tensor", Queue(noises[1:]))
    image, t_last = path.sigma(torch.tensor(1.0, dtype=torch.float64)) * noises[0], ref.timesteps[0] + 1  # we start at sigma(t_0) x1  # pipeline_repaint.py, RePaintPipeline.__call__
    for t in ref.timesteps:
        if t < t_last:
            eps = FakeEpsNet()(image, torch.full((2,), (int(t) + 1) / T, dtype=torch.float64))
            image = ref.step(eps, t, image, known, mask.double(), None).prev_sample
        else:
            image = ref.undo_step(image, t_last, None)
        t_last = t

    walk, ours = repaint_walk(T, jl, r), [noises[0]]
    for k, (p, q) in enumerate(zip(walk[:-1], walk[1:])):  # a step to t > 0 draws DDIM's noise, then the known part's
        ours += [noises[k + 1]] * (2 if q > p and q < T and eta > 0 else 1)
    queue = Queue(ours)
    monkeypatch.setattr(editing, "draw_noise", queue)
    monkeypatch.setattr(sde, "draw_noise", queue)
    grid = torch.cat([torch.arange(T, 0, -1, dtype=torch.float64) / T, torch.zeros(1, dtype=torch.float64)])
    out = repaint(partial(ddim, eta=eta), denoiser, known, mask, grid, jl, r)
    assert not queue.noises
    assert (out - image).abs().max() < 1e-10, (out - image).abs().max().item()
    assert torch.equal(out[:, mask], known[:, mask])


def test_repaint_without_resampling_is_replacement_in_distribution():
    """jump_n_sample = 1 takes no jump: on independent coordinates it passes the same KS test as replacement (400 DDIM
    steps: at 100 the spread of x[1] is 5% short, 0.211 against 0.224, DDIM's own error, which 4000 draws see)."""
    from diffcli.editing import repaint

    denoiser = oracle(ONE_DIAGONAL)
    x_known = torch.zeros(4000, 2, dtype=torch.float64)
    x_known[:, 0] = 1.1
    out = repaint(ddim, denoiser, x_known, torch.tensor([True, False]), uniform_grid(denoiser.path, 400), 10, 1,
                  torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], x_known[:, 0])
    assert stats.kstest(out[:, 1].numpy(), stats.norm(-0.4, math.sqrt(0.05)).cdf).pvalue > 0.01


def test_dps_equals_the_reference_sampling_loop(monkeypatch):
    """DPS2022/diffusion-posterior-sampling: gaussian_diffusion.py p_sample_loop (lines 180-199) with DDPM.p_sample
    (lines 365-373), the epsilon mean processor and fixed_small variance (posterior_mean_variance.py lines 96-129,
    159-175), clip_denoised off, and condition_methods.py PosteriorSampling (lines 28-32, 84-87), transcribed here; one
    image per batch (the reference's norm is over the batch). Our ancestral sampler with dps, the same noises: equal to
    1e-10 in float64, with a box down-sampling operator."""
    import diffcli.editing as editing
    import diffcli.samplers.sde as sde
    from diffcli.editing import BoxDown, dps
    from diffcli.paths import DDPMPath
    from diffcli.samplers import ancestral

    T, scale = 25, 0.4
    path = DDPMPath(T=T)
    denoiser = Denoiser(FakeEpsNet(), path, "eps", "none", 0.5)
    g = torch.Generator().manual_seed(1)
    A = BoxDown(2)
    y = A(torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1)
    noises = [torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(T + 1)]

    betas = path.betas
    alphas, abar = 1 - betas, torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    coef1, coef2 = betas * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * alphas.sqrt() / (1 - abar)
    variance = betas * (1 - abar_prev) / (1 - abar)
    img = path.sigma(torch.tensor(1.0, dtype=torch.float64)) * noises[0]  # diffcli starts at sigma(t_0) x1 (the reference: at x1)
    for idx in reversed(range(T)):
        img = img.requires_grad_()
        eps = FakeEpsNet()(img, torch.full((1,), (idx + 1) / T, dtype=torch.float64))
        pred_xstart = (1 / abar[idx]).sqrt() * img - (1 / abar[idx] - 1).sqrt() * eps
        sample = coef1[idx] * pred_xstart + coef2[idx] * img
        if idx != 0:
            sample = sample + variance[idx].sqrt() * noises[T - idx]
        norm = torch.linalg.norm(y - A(pred_xstart))
        norm_grad = torch.autograd.grad(outputs=norm, inputs=img)[0]
        img = (sample - norm_grad * scale).detach()

    queue = Queue(noises[:T])
    monkeypatch.setattr(editing, "draw_noise", queue)
    monkeypatch.setattr(sde, "draw_noise", queue)
    grid = torch.cat([torch.arange(T, 0, -1, dtype=torch.float64) / T, torch.zeros(1, dtype=torch.float64)])
    out = dps(ancestral, denoiser, A, y, (1, 1, 4, 4), grid, scale)
    assert (out - img).abs().max() < 1e-10, (out - img).abs().max().item()


def test_dps_evaluates_the_network_once_a_step_and_at_scale_zero_is_the_plain_sampler():
    """The sampler's own evaluation at x_t is the one DPS made for its gradient (NFE = steps with ancestral
    sampling), and scale = 0 leaves an ordinary sample of the same seed."""
    from diffcli.editing import Matrix, dps
    from diffcli.guidance import CountNFE
    from diffcli.samplers import ancestral

    denoiser, grid = oracle(GMM), uniform_grid(VPPath(), 20)
    counted = CountNFE(denoiser)
    y = torch.full((8, 1), 0.5, dtype=torch.float64)
    out = dps(ancestral, counted, Matrix(torch.tensor([[1.0, 0.0]], dtype=torch.float64)), y, (8, 2), grid, 0.0,
              torch.Generator().manual_seed(2))
    assert counted.nfe == 20
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(8, 2, generator=g, dtype=torch.float64)
    plain = ancestral(denoiser, denoiser.path, denoiser.path.sigma(grid[0]) * x1, grid, generator=g)
    assert torch.allclose(out, plain, atol=1e-12, rtol=0)


def test_the_operators_against_scipy_and_block_means():
    """Blur is scipy.ndimage.gaussian_filter with zero padding and the same support; BoxDown is the block mean."""
    import numpy as np
    from scipy import ndimage

    from diffcli.editing import Blur, BoxDown, Masked

    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    ref = np.stack([[ndimage.gaussian_filter(c, 1.5, mode="constant", truncate=3 / 1.5) for c in img]
                    for img in x.numpy()])
    assert np.abs(Blur(7, 1.5)(x).numpy() - ref).max() < 1e-12
    assert torch.allclose(BoxDown(4)(x)[0, 1, 1, 0], x[0, 1, 4:8, 0:4].mean())
    mask = torch.rand(3, 8, 8, generator=g) < 0.5
    assert torch.equal(Masked(mask)(x), torch.where(mask, x, 0))
    with pytest.raises(DiffcliError, match="does not divide"):
        BoxDown(3)(x)
