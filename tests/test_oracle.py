"""net=oracle: E[x0 | x_t] against Monte Carlo, the linear-Gaussian posterior and Tweedie's formula."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.distributions import MultivariateNormal

from conftest import compose_config
from diffcli import DiffcliError
from diffcli.toys import TOYS
from diffcli.oracle import Oracle
from diffcli.paths import DDPMPath, FlowPath, VEPath, VPPath

EIGHT = {"kind": "toy", "name": "eight_gaussians", "params": {"radius": 2.0, "std": 0.3}}
GMM = {"kind": "toy", "name": "gmm", "params": {"means": [[-1.0, 0.5], [1.5, -0.5], [0.0, -1.5]],
                                                "covs": [[[0.3, 0.15], [0.15, 0.2]], [[0.1, -0.06], [-0.06, 0.25]],
                                                         [[0.4, 0.1], [0.1, 0.08]]],
                                                "weights": [0.5, 0.3, 0.2]}}
GMM_DIAG = {"kind": "toy", "name": "gmm", "params": {"means": [[-1.0, 0.5], [1.5, -0.5]],
                                                     "covs": [[[0.3, 0.0], [0.0, 0.05]], [[0.1, 0.0], [0.0, 0.4]]],
                                                     "weights": [0.7, 0.3]}}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def points(tmp_path):
    """A small npz image set (30 images 1x3x3) and its points as the model sees them, (30, 9) in [-1, 1]."""
    images = np.random.default_rng(0).integers(0, 256, (30, 3, 3), dtype=np.uint8)
    np.savez(tmp_path / "pts.npz", images=images)
    data = {"kind": "npz", "name": "pts", "path": str(tmp_path / "pts.npz")}
    return data, torch.from_numpy(images).double().reshape(30, 9) / 127.5 - 1


def monte_carlo_x0(x0, x_q, path, t):
    """Self-normalised importance average of prior-sample x0 under p(x_q | x0), for each query x_q."""
    a, s = path.alpha(t), path.sigma(t)
    r = x_q[:, None] - a * x0[None]  # (Q, N, d)
    if path.prior == "gaussian":
        w = torch.softmax(-(r**2).sum(-1) / (2 * s**2), 1)
    else:  # uniform on [-1, 1]^d: p(x_q | x0) is the indicator of the box |x_q - a x0|_inf <= s
        w = (r.abs().amax(-1) <= s).double()
        w = w / w.sum(1, keepdim=True)
    assert (1 / (w**2).sum(1)).min() > 2000  # enough effective samples for the tolerance below
    return w @ x0


@pytest.mark.parametrize("case", ["eight_gaussians-vp", "gmm-ve", "gmm_diag-flow_uniform", "points-ddpm",
                                  "points-flow_uniform"])
def test_x0_hat_matches_monte_carlo(case, points):
    data, path, t = {"eight_gaussians-vp": (EIGHT, VPPath(), 0.3), "gmm-ve": (GMM, VEPath(0.01, 7.4), 0.6),
                     "gmm_diag-flow_uniform": (GMM_DIAG, FlowPath(prior="uniform"), 0.5),
                     "points-ddpm": (points[0], DDPMPath(), 0.2),
                     "points-flow_uniform": (points[0], FlowPath(prior="uniform"), 0.6)}[case]
    n = 400_000
    if data["kind"] == "npz":
        x0 = points[1][torch.randint(len(points[1]), (n,), generator=gen(1))]
    else:
        x0 = TOYS[data["name"]](n, generator=gen(1), device="cpu", **data["params"]).double()
    t = torch.tensor(t, dtype=torch.float64)
    x1 = path.sample_prior((4, x0.shape[1]), gen(2), "cpu").double()
    x_q = path.marginal(x0[-4:], x1, t)  # query points where x_t actually lands
    oracle = Oracle(x0.shape[1:], data, path, "x0")
    expected = monte_carlo_x0(x0[:-4], x_q, path, t)
    got = oracle(x_q, t.expand(4))
    assert got.dtype == torch.float64 and torch.allclose(got, expected, atol=0.02), (got, expected)


def test_single_gaussian_is_the_linear_posterior():
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    data = {"kind": "toy", "name": "gmm", "params": {"means": [mu.tolist()], "covs": [cov.tolist()]}}
    path = VPPath()
    t = torch.tensor([0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    x_t = torch.randn(4, 2, generator=gen(), dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    expected = []
    for i in range(4):  # posterior precision S^-1 + a^2 / s^2 I, mean = posterior cov (S^-1 mu + a x_t / s^2)
        precision = torch.linalg.inv(cov) + a[i] ** 2 / s[i] ** 2 * torch.eye(2, dtype=torch.float64)
        expected.append(torch.linalg.solve(precision, torch.linalg.solve(cov, mu) + a[i] * x_t[i] / s[i] ** 2))
    got = Oracle((2,), data, path, "x0")(x_t, t)
    assert torch.allclose(got, torch.stack(expected), atol=1e-10)


@pytest.mark.parametrize("data", [EIGHT, GMM], ids=["eight_gaussians", "gmm"])
@pytest.mark.parametrize("path", [VPPath(), VEPath(0.01, 7.4), DDPMPath()], ids=["vp", "ve", "ddpm"])
def test_score_is_the_gradient_of_the_log_marginal(data, path):
    """Tweedie: the oracle's score equals autograd's grad of log sum_k w_k N(x_t; a mu_k, a^2 S_k + s^2 I)."""
    oracle = Oracle((2,), data, path, "score")
    means, covs, log_w = oracle.means, oracle.covs, oracle.log_weights
    t = torch.tensor([0.02, 0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    x_t = (2 * torch.randn(5, 2, generator=gen(3), dtype=torch.float64)).requires_grad_()
    a, s = path.alpha(t)[:, None, None, None], path.sigma(t)[:, None, None, None]
    mixture = MultivariateNormal(a[..., 0] * means, a**2 * covs + s**2 * torch.eye(2, dtype=torch.float64))
    log_p = torch.logsumexp(mixture.log_prob(x_t[:, None]) + log_w, 1)
    (grad,) = torch.autograd.grad(log_p.sum(), x_t)
    assert torch.allclose(oracle(x_t.detach(), t), grad, rtol=1e-6, atol=1e-6)


def test_sigma_zero_and_alpha_zero_are_finite():
    oracle = Oracle((2,), GMM, FlowPath(), "velocity")
    x_t = torch.randn(3, 2, generator=gen())
    assert torch.allclose(oracle(x_t, torch.zeros(3)), -x_t)  # t = 0: x0_hat = x_t, E[x1] = 0
    assert torch.isfinite(oracle(x_t, torch.ones(3))).all()
    uniform = Oracle((2,), GMM_DIAG, FlowPath(prior="uniform"), "x0")
    assert torch.allclose(uniform(x_t, torch.zeros(3)), x_t) and torch.isfinite(uniform(x_t, torch.ones(3))).all()


def test_points_without_any_box_fall_back_to_the_nearest_point(points):
    data, pts = points
    oracle = Oracle((1, 3, 3), data, FlowPath(prior="uniform"), "x0")
    far = 5 * pts[7].reshape(1, 1, 3, 3).float()  # far outside every box at t = 0.1
    assert torch.allclose(oracle(far, torch.tensor([0.1])).double().flatten(1), pts[7:8], atol=1e-6)


def test_state_dict_round_trip_and_no_parameters(points):
    for data in (GMM, points[0]):
        oracle = Oracle((2,), data, VPPath(), "eps")
        assert list(oracle.parameters()) == [] and oracle.state_dict()
        state = {k: v + 1 for k, v in oracle.state_dict().items()}
        fresh = Oracle((2,), data, VPPath(), "eps")
        fresh.load_state_dict(state, strict=True)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_composes_from_hydra():
    cfg = compose_config("train", ["net=oracle", "data=eight_gaussians", "model=vpsde"])
    oracle = instantiate(cfg.net, shape=(2,))
    assert isinstance(oracle, Oracle) and isinstance(oracle.path, VPPath) and oracle.prediction == "eps"
    assert oracle(torch.zeros(4, 2), torch.full((4,), 0.5)).shape == (4, 2)
    flow = instantiate(compose_config("train", ["net=oracle", "data=gmm", "model=flow"]).net, shape=(2,))
    assert flow.path.prior == "gaussian" and flow.means.shape == (3, 2)


def test_errors_are_one_line(tmp_path):
    with pytest.raises(DiffcliError, match="data=moons has no closed-form") as e:
        Oracle((2,), {"kind": "toy", "name": "moons", "params": {}}, VPPath(), "eps")
    assert "\n" not in str(e.value)
    with pytest.raises(DiffcliError, match="uniform prior needs diagonal covariances") as e:
        Oracle((2,), GMM, FlowPath(prior="uniform"), "velocity")
    assert "\n" not in str(e.value)
    np.savez(tmp_path / "big.npz", images=np.zeros((5001, 1, 1), np.uint8))
    with pytest.raises(DiffcliError, match="5001 images") as e:
        Oracle((1, 1, 1), {"kind": "npz", "name": "big", "path": str(tmp_path / "big.npz")}, VPPath(), "eps")
    assert "\n" not in str(e.value)


def test_a_point_set_oracle_loaded_from_a_checkpoint_reads_no_data_file(tmp_path, points):
    """Its points are the checkpoint's own tensors: the npz its stored config names (here deleted, as a file sent
    to you may name any path) is never opened, and the loaded oracle equals the one trained."""
    from diffcli.loading import load_model
    from diffcli.train import run_train

    from diffcli.oracle import _points

    data, _ = points
    trained = _points(data)
    run_train(compose_config("train", ["data=npz", f"data.path={data['path']}", "net=oracle", "model=flow",
                                       "device=cpu", "train.sample_every=0"]), tmp_path / "run")
    (tmp_path / "pts.npz").unlink()
    model = load_model(str(tmp_path / "run"), torch.device("cpu"))
    assert torch.equal(model.denoiser.net.points, trained)
