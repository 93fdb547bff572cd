"""Conditional generation checked where the answer is known: a labelled Gaussian mixture, whose class is the
component a point was drawn from, so E[x0 | x_t, y] and p_t(y | x_t) are closed forms (net=oracle).

Bayes, grad log p_t(y | x) = grad log p_t(x | y) - grad log p_t(x), makes classifier guidance at scale s on the
exact classifier the same sampler as classifier-free guidance at w = s on the exact conditional and
unconditional oracles; that is asserted, not that CFG samples the tilted density p(x | y)^w p(x)^(1-w).
"""

import pytest
import torch

from diffcli import DiffcliError
from diffcli.nets import MLP, UNet
from diffcli.oracle import Oracle
from diffcli.paths import DDPMPath, FlowPath, VEPath, VPPath
from diffcli.guidance import CountNFE, condition
from diffcli.prediction import Denoiser
from diffcli.samplers import ancestral, euler, heun, karras_grid, uniform_grid

EIGHT = {"kind": "toy", "name": "eight_gaussians", "params": {"radius": 2.0, "std": 0.1}}
GMM = {"kind": "toy", "name": "gmm", "params": {"means": [[-1.0, 0.5], [1.5, -0.5], [0.0, -1.5]],
                                                "covs": [[[0.3, 0.15], [0.15, 0.2]], [[0.1, -0.06], [-0.06, 0.25]],
                                                         [[0.4, 0.1], [0.1, 0.08]]],
                                                "weights": [0.5, 0.3, 0.2]}}
PATHS = {"vp": VPPath(), "ve": VEPath(0.01, 7.4), "ddpm": DDPMPath(), "flow": FlowPath()}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def oracle_denoiser(data, path, prediction="x0"):
    return Denoiser(Oracle((2,), data, path, prediction), path, prediction)


def classifier_guided(data, path, labels, scale, prediction="x0"):
    """The exact unconditional oracle guided by the exact classifier log p_t(y | x_t) at `scale`."""
    d = oracle_denoiser(data, path, prediction)
    # guidance 0: the unconditional model, as in Dhariwal & Nichol's unconditional guided sampling
    return condition(d, labels, guidance=0.0, classifier=d.net.log_class_probs, classifier_scale=scale)


def cfg(data, path, labels, w, prediction="x0", interval=None, guide=None):
    return condition(oracle_denoiser(data, path, prediction), labels, guidance=w, guidance_interval=interval,
                     guide=guide)


def test_conditional_oracle_is_the_component_posterior_mean():
    """E[x0 | x_t, y] = mu_y + a S_y C_y^-1 (x_t - a mu_y); the mixture's E[x0 | x_t] is their p_t(y | x_t)-average."""
    path, oracle = VPPath(), Oracle((2,), GMM, VPPath(), "x0")
    t = torch.tensor([0.05, 0.3, 0.7], dtype=torch.float64)
    x_t = torch.randn(3, 2, generator=gen(1), dtype=torch.float64)
    a, s = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]
    for y in range(3):
        mu, S = oracle.means[y], oracle.covs[y]
        C = a**2 * S + s**2 * torch.eye(2, dtype=torch.float64)
        want = mu + (a * S @ torch.linalg.solve(C, (x_t - a[..., 0] * mu)[..., None]))[..., 0]
        got = oracle(x_t, t, torch.full((3,), y))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    p = oracle.log_class_probs(x_t, t).exp()
    mixed = sum(p[:, y, None] * oracle(x_t, t, torch.full((3,), y)) for y in range(3))
    torch.testing.assert_close(oracle(x_t, t), mixed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(oracle(x_t, t, torch.full((3,), 3)), oracle(x_t, t))  # class K: "no label"


@pytest.mark.parametrize("path", ["vp", "ve", "ddpm"])
@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_classifier_guidance_on_the_exact_classifier_is_cfg(path, prediction):
    """x0_hat of CG at scale s equals x0_hat of CFG at w = s, for the exact oracles (Bayes + Tweedie), to 1e-6."""
    path = PATHS[path]
    t = torch.tensor([0.02, 0.2, 0.5, 0.8, 0.97], dtype=torch.float64)
    x_t = 1.5 * torch.randn(5, 2, generator=gen(2), dtype=torch.float64) * path.sigma(t)[:, None].clamp(min=1)
    labels = torch.tensor([0, 3, 5, 7, 2])
    for s in (0.0, 1.0, 2.5, 7.0):
        got = classifier_guided(EIGHT, path, labels, s, prediction).predict(x_t, t)
        want = cfg(EIGHT, path, labels, s, prediction).predict(x_t, t)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_scale_one_is_the_conditional_oracle():
    path, labels = VPPath(), torch.tensor([0, 1, 2, 1])
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    x_t = torch.randn(4, 2, generator=gen(3), dtype=torch.float64)
    conditional = Oracle((2,), GMM, path, "x0")(x_t, t, labels)
    torch.testing.assert_close(classifier_guided(GMM, path, labels, 1.0)(x_t, t), conditional, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cfg(GMM, path, labels, 1.0)(x_t, t), conditional, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler,grid", [(euler, uniform_grid), (heun, karras_grid)], ids=["euler", "heun"])
@pytest.mark.parametrize("path", ["vp", "ve"])
def test_whole_trajectories_agree(sampler, grid, path):
    """Sampled with the same start, the CG and CFG trajectories agree to 1e-6 at every state."""
    path = PATHS[path]
    labels = torch.arange(8).repeat(4)
    ts = grid(path, 20).double()
    x1 = torch.randn(32, 2, generator=gen(4), dtype=torch.float64) * path.sigma(ts[0])
    runs = []
    for d in (classifier_guided(EIGHT, path, labels, 3.0), cfg(EIGHT, path, labels, 3.0)):
        visited = []
        sampler(d, path, x1.clone(), ts, trajectory=visited)
        runs.append(torch.stack(visited))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["vp", "ddpm", "flow"])
def test_every_conditional_sample_lands_in_its_component(path):
    """The conditional oracle (w = 1) puts every sample of class y in component y of eight_gaussians."""
    path = PATHS[path]
    labels = torch.arange(8).repeat(25)
    d = cfg(EIGHT, path, labels, 1.0)
    ts = karras_grid(path, 30).double()
    x = heun(d, path, torch.randn(200, 2, generator=gen(5), dtype=torch.float64) * path.sigma(ts[0]), ts)
    nearest = torch.cdist(x, d.net.means).argmin(1)
    assert (nearest == labels).all()
    assert (torch.linalg.vector_norm(x - d.net.means[labels], dim=1) < 5 * 0.1).all()


def test_adherence_grows_with_guidance_on_the_oracle():
    """On a mixture with overlapping components, the share of samples in their class's component rises with w."""
    close = {"kind": "toy", "name": "gmm", "params": {"means": [[-0.4, 0.0], [0.4, 0.0]],
                                                      "covs": [[[0.25, 0.0], [0.0, 0.25]]] * 2,
                                                      "weights": [0.5, 0.5]}}
    path, labels = VPPath(), torch.arange(2).repeat(500)
    ts = karras_grid(path, 30).double()
    x1 = torch.randn(1000, 2, generator=gen(6), dtype=torch.float64) * path.sigma(ts[0])
    share = []
    for w in (0.0, 1.0, 3.0):
        d = cfg(close, path, labels, w)
        x = heun(d, path, x1.clone(), ts)
        posterior = Oracle((2,), close, path, "x0").log_class_probs(x, torch.zeros(len(x), dtype=torch.float64))
        share.append((posterior.argmax(1) == labels).double().mean().item())
    assert 0.45 < share[0] < 0.55 and share[0] < share[1] < share[2], share


def test_cfg_is_one_batched_forward_of_both_halves():
    """w (D_c - D_u) + D_u with both halves from one forward; nfe counts one evaluation; w = 0 is unconditional."""
    torch.manual_seed(0)
    net = MLP((2,), hidden=32, depth=1, emb_dim=8, n_classes=3).double()
    bare = Denoiser(net, VPPath(), "eps")
    x_t, t, labels = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.4, dtype=torch.float64), \
        torch.tensor([0, 1, 2, 0])
    x0_c = condition(bare, labels, guidance=1.0)(x_t, t)
    x0_u = condition(bare, labels, guidance=0.0)(x_t, t)
    torch.testing.assert_close(x0_u, Denoiser(net, VPPath(), "eps")(x_t, t))  # y=None is the "no label" class
    d = CountNFE(condition(bare, labels, guidance=2.5))
    torch.testing.assert_close(d(x_t, t), x0_u + 2.5 * (x0_c - x0_u))
    assert d.nfe == 1


def test_label_embedding_changes_the_output_and_unconditional_nets_refuse_labels():
    torch.manual_seed(0)
    unet = UNet((1, 8, 8), ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), groups=4, n_classes=10)
    torch.nn.init.normal_(unet.label_embed.embed.weight)
    unet.eval()  # dropout off
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    assert not torch.allclose(unet(x, t, torch.tensor([1, 1])), unet(x, t, torch.tensor([2, 2])))
    torch.testing.assert_close(unet(x, t), unet(x, t, torch.tensor([10, 10])))
    plain = MLP((2,), hidden=16, depth=1, emb_dim=8)
    assert plain.n_classes == 0 and not any("label" in k for k in plain.state_dict())
    with pytest.raises(DiffcliError, match="without classes"):
        plain(torch.randn(2, 2), torch.full((2,), 0.5), torch.tensor([0, 1]))
    with pytest.raises(DiffcliError, match="class-conditional model"):
        d = condition(Denoiser(plain, VPPath(), "eps"), torch.tensor([0, 1]), guidance=3.0)
        d(torch.randn(2, 2), 0.5)


def test_ancestral_with_guidance_runs_on_ddpm():
    """Guidance in the Denoiser reaches the stochastic samplers unchanged."""
    path = DDPMPath()
    from diffcli.samplers import ddim_grid

    labels = torch.arange(8).repeat(8)
    ts = ddim_grid(path, 100).double()
    d = cfg(EIGHT, path, labels, 1.0)
    x = ancestral(d, path, torch.randn(64, 2, generator=gen(7), dtype=torch.float64), ts, generator=gen(8))
    assert (torch.cdist(x, d.net.means).argmin(1) == labels).all()


class Unconditional(torch.nn.Module):
    """The oracle with its labels ignored: an unconditional model of the same data (n_classes = 0)."""

    raw_input = True

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle

    def forward(self, x_t, t):
        return self.oracle(x_t, t)


@pytest.mark.parametrize("path", ["vp", "flow"])
def test_autoguidance_with_the_unconditional_model_as_guide_is_cfg(path):
    """D_guide + w (D - D_guide) with D_guide = D(x | no label) is CFG's rule, term for term; a guide equal to the
    model changes nothing at any w (Karras et al. 2024, eq. 2)."""
    path, labels = PATHS[path], torch.tensor([0, 3, 5, 7, 2])
    t = torch.tensor([0.02, 0.2, 0.5, 0.8, 0.97], dtype=torch.float64)
    x_t = torch.randn(5, 2, generator=gen(9), dtype=torch.float64)
    for w in (0.0, 1.0, 2.5):
        auto = cfg(EIGHT, path, labels, w, guide=Denoiser(Unconditional(oracle_denoiser(EIGHT, path).net), path, "x0"))
        for g, want in zip(auto.predict(x_t, t), cfg(EIGHT, path, labels, w).predict(x_t, t)):
            torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
        same = cfg(EIGHT, path, labels, w, guide=oracle_denoiser(EIGHT, path))
        torch.testing.assert_close(same(x_t, t), cfg(EIGHT, path, labels, 1.0)(x_t, t), rtol=1e-12, atol=1e-12)


def test_guidance_interval_guides_only_inside_it():
    """Inside lo < sigma/alpha <= hi the step is CFG's at w, outside it the conditional model's (w = 1)."""
    path, labels = VEPath(0.01, 7.4), torch.tensor([1, 4, 6])
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)  # sigma/alpha below, inside, above the interval
    s = path.sigma(t)
    x_t = torch.randn(3, 2, generator=gen(10), dtype=torch.float64)
    d = cfg(EIGHT, path, labels, 4.0, interval=(float(s[0]) * 1.01, float(s[2]) * 0.99))
    got = d(x_t, t)
    guided, plain = cfg(EIGHT, path, labels, 4.0)(x_t, t), cfg(EIGHT, path, labels, 1.0)(x_t, t)
    torch.testing.assert_close(got, torch.stack([plain[0], guided[1], plain[2]]), rtol=1e-12, atol=1e-12)
    d = cfg(EIGHT, path, labels, 4.0, interval=(0.0, float(s[0]) * 0.5))  # the whole batch outside: conditional
    torch.testing.assert_close(d(x_t, t), plain, rtol=1e-12, atol=1e-12)


def test_classifier_guidance_refuses_a_flow_without_a_score():
    path = FlowPath(prior="uniform")
    diag = {"kind": "toy", "name": "gmm", "params": {"means": [[-1.0, 0.5], [1.5, -0.5]],
                                                     "covs": [[[0.3, 0.0], [0.0, 0.05]], [[0.1, 0.0], [0.0, 0.4]]]}}
    with pytest.raises(DiffcliError, match="uniform prior has none"):
        d = classifier_guided(diag, path, torch.tensor([0, 1]), 2.0)
        d(torch.zeros(2, 2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("path", ["vp", "ve"])
def test_noisy_classifier_is_the_bayes_posterior_of_the_noised_mixture(path):
    """log p_t(y | x_t) = log softmax_k [log w_k + log N(x_t; a mu_k, a^2 S_k + s^2 I)], from torch.distributions."""
    path, oracle = PATHS[path], Oracle((2,), GMM, PATHS[path], "x0")
    t = torch.tensor([0.0, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    x_t = 1.5 * torch.randn(5, 2, generator=gen(11), dtype=torch.float64)
    a, s = path.alpha(t)[:, None, None, None], path.sigma(t)[:, None, None, None]
    noised = torch.distributions.MultivariateNormal(a[..., 0] * oracle.means,
                                                    a**2 * oracle.covs + s**2 * torch.eye(2, dtype=torch.float64))
    want = torch.log_softmax(noised.log_prob(x_t[:, None]) + oracle.log_weights, 1)
    torch.testing.assert_close(oracle.log_class_probs(x_t, t), want, rtol=1e-9, atol=1e-9)


def test_noisy_classifier_under_the_uniform_prior_is_the_box_probability():
    """x1 uniform on [-1, 1]^d: p(y | x_t) ∝ w_y P(|x_t - a x0|_inf <= s | y), a product of normal cdf differences;
    at s = 0 (t = 0) the posterior of the diagonal Gaussians' densities at x0 = x_t."""
    path = FlowPath(prior="uniform")
    diag = {"kind": "toy", "name": "gmm", "params": {"means": [[-1.0, 0.5], [1.5, -0.5]],
                                                     "covs": [[[0.3, 0.0], [0.0, 0.05]], [[0.1, 0.0], [0.0, 0.4]]],
                                                     "weights": [0.7, 0.3]}}
    oracle = Oracle((2,), diag, path, "x0")
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    x_t = torch.tensor([[0.2, 0.1], [-0.5, 0.3], [0.6, -0.2]], dtype=torch.float64)
    a, s = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]
    normal = torch.distributions.Normal(oracle.means, oracle.covs.diagonal(dim1=-2, dim2=-1).sqrt())
    box = normal.cdf((x_t[:, None] + s) / a) - normal.cdf((x_t[:, None] - s) / a)  # (B, K, d)
    want = torch.log_softmax(oracle.log_weights + box.log().sum(-1), 1)
    torch.testing.assert_close(oracle.log_class_probs(x_t, t), want, rtol=1e-9, atol=1e-9)
    at_zero = torch.log_softmax(oracle.log_weights + normal.log_prob(x_t[:, None]).sum(-1), 1)
    torch.testing.assert_close(oracle.log_class_probs(x_t, torch.zeros(3, dtype=torch.float64)), at_zero,
                               rtol=1e-9, atol=1e-9)


def test_cfg_on_x0_is_diffusers_rule_on_eps():
    """diffusers' pipelines guide eps: eps_u + w (eps_c - eps_u); the Denoiser's x0_hat is that eps's
    (x_t - sigma eps) / alpha (Ho et al. 2020, eq. 15)."""
    torch.manual_seed(1)
    path = DDPMPath()
    net = MLP((2,), hidden=32, depth=1, emb_dim=8, n_classes=4).double()
    torch.nn.init.normal_(net.label_embed.embed.weight)
    x_t, t, labels = torch.randn(6, 2, dtype=torch.float64), torch.full((6,), 0.3, dtype=torch.float64), \
        torch.tensor([0, 1, 2, 3, 0, 1])
    eps_c, eps_u = net(x_t, t, labels), net(x_t, t, torch.full((6,), 4))
    eps = eps_u + 3.0 * (eps_c - eps_u)
    d = condition(Denoiser(net, path, "eps"), labels, guidance=3.0)
    torch.testing.assert_close(d(x_t, t), (x_t - path.sigma(t)[:, None] * eps) / path.alpha(t)[:, None],
                               rtol=1e-10, atol=1e-10)
