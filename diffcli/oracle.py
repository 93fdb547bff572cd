"""net=oracle: the exact prediction for a data distribution known in closed form.

On a path x_t = alpha x0 + sigma x1 the best any network can do is x0_hat = E[x0 | x_t]; the
oracle computes it exactly, takes x1_hat = (x_t - alpha x0_hat) / sigma and returns
target(prediction, path, x0_hat, x1_hat, t), so it drops into the Denoiser like a trained net. It takes
x_t and t as they are (`raw_input`): model.precond, a trained network's input scaling, does not apply.
It knows Gaussian mixtures (eight_gaussians, gmm) and small point sets (data.kind=npz), under the
Gaussian prior and the uniform one on [-1, 1]^d. Everything is computed in float64.

A mixture's component is its class label: oracle(x_t, t, y) is the exact E[x0 | x_t, y] (class K, one past
the last, means "no label"), and `log_class_probs` is the exact noisy classifier log p_t(y | x_t), the
posterior over components, for classifier guidance.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import DiffcliError
from .data import build_data, to_float
from .toys import MIXTURES
from .paths import ProbabilityPath
from .prediction import SIGMA_DATA, check_prediction, target

MAX_POINTS = 5000  # the point-set oracle compares x_t with every point at every call


def _points(data) -> torch.Tensor:
    """Every image of an npz data set as float64 rows in [-1, 1], (N, C*H*W)."""
    images = build_data(data, "cpu")
    if len(images) > MAX_POINTS:
        raise DiffcliError(f"net=oracle sums over every point: {data.get('path')} holds {len(images)} images, more "
                           f"than {MAX_POINTS}; save a subset with np.savez(path, images=images[:{MAX_POINTS}])")
    return to_float(images.images).flatten(1).double()


def _truncated_normal(lo: torch.Tensor, hi: torch.Tensor):
    """log P(lo < z < hi) and E[z | lo < z < hi] for z ~ N(0, 1), accurate in both tails."""
    flip = lo > 0  # an interval in the upper tail: use its mirror image, where log_ndtr keeps precision
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi = torch.special.log_ndtr(hi)
    log_z = log_hi + torch.log1p(-torch.exp(torch.special.log_ndtr(lo) - log_hi))
    log_phi = lambda u: -u**2 / 2 - math.log(2 * math.pi) / 2  # noqa: E731
    mean = torch.exp(log_phi(lo) - log_z) - torch.exp(log_phi(hi) - log_z)
    # far out in a tail (x_t off the support) the ratio loses all precision: keep the mean inside
    # its interval, which gives the limit there, the nearer end (nan arises only as 0 * inf)
    mean = mean.nan_to_num(0).clamp(lo, hi)
    return log_z, torch.where(flip, -mean, mean)


class Oracle(nn.Module):
    """oracle(x_t, t) -> the exact `prediction` for the data config's distribution; no parameters.

    The distribution is kept in buffers (means, covs, log_weights or points), so state_dict holds it.
    `sigma_data` is the model's, for prediction F.
    """

    raw_input = True  # E[x0 | x_t] needs the path's own x_t and t (prediction.net_inputs)

    def __init__(self, shape, data, path: ProbabilityPath, prediction: str, sigma_data: float = SIGMA_DATA,
                 points: torch.Tensor | None = None):
        super().__init__()
        self.shape, self.path, self.prediction = tuple(shape), path, check_prediction(prediction, path)
        self.sigma_data = sigma_data
        data = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
        name, kind = data.get("name"), data.get("kind")
        if kind == "npz":  # `points`: a checkpoint's own (loading reads no data file)
            self.register_buffer("points", _points(data) if points is None else points.double())
        elif kind == "toy" and name in MIXTURES:
            means, covs, weights = MIXTURES[name](**(data.get("params") or {}))
            off_diagonal = covs - torch.diag_embed(covs.diagonal(dim1=-2, dim2=-1))
            if path.prior == "uniform" and off_diagonal.abs().max() > 0:
                raise DiffcliError(f"net=oracle with a uniform prior needs diagonal covariances (E[x0|x_t] is a product"
                                   f" of truncated normals); data={name} has full ones; use model.prior=gaussian")
            self.register_buffer("means", means.double())
            self.register_buffer("covs", covs.double())
            self.register_buffer("log_weights", weights.double().log())
        else:
            raise DiffcliError(f"net=oracle knows eight_gaussians, gmm and npz point sets; data={name} has no "
                               f"closed-form E[x0|x_t]")

    @property
    def n_classes(self) -> int:
        """The number of mixture components (the classes); 0 for a point set, which has none."""
        return len(self.log_weights) if hasattr(self, "log_weights") else 0

    def components(self, x_t: torch.Tensor, t: torch.Tensor):
        """(log p_t(k | x_t) (B, K), E[x0 | x_t, k] (B, K, d)) for a mixture, in float64."""
        x = x_t.flatten(1).double()
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        if self.path.prior == "uniform":
            log_p, x0_k = self._mixture_uniform(x, a, s)
            # at sigma = 0 the box is a point: x0 = x_t / alpha exactly, and p(k | x0) is Bayes on the density
            x0 = x / a.clamp_min(1e-300)
            var = self.covs.diagonal(dim1=-2, dim2=-1)  # (K, d)
            log_p0 = self.log_weights - 0.5 * ((x0[:, None] - self.means) ** 2 / var + var.log()).sum(-1)
            log_p = torch.where(s > 0, log_p, log_p0)
            x0_k = torch.where(s[:, :, None] > 0, x0_k, x0[:, None])
        else:
            log_p, x0_k = self._mixture_gaussian(x, a, s)
        return torch.log_softmax(log_p, 1), x0_k

    def log_class_probs(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The exact noisy classifier log p_t(y | x_t) over the components, (B, K), float64."""
        if not self.n_classes:
            raise DiffcliError("net=oracle on a point set has no classes; use a mixture (data=eight_gaussians or gmm)")
        t = torch.as_tensor(t, device=x_t.device).double().expand(x_t.shape[0])
        return self.components(x_t, t)[0]

    def x0_hat(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t] (or E[x0 | x_t, y] where y < K) in float64, shape (B, d) for x_t flattened to (B, d)."""
        if hasattr(self, "points"):
            if y is not None:
                raise DiffcliError("net=oracle on a point set has no classes; use a mixture (data=eight_gaussians "
                                   "or gmm) for labels")
            x = x_t.flatten(1).double()
            a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
            return (self._points_uniform if self.path.prior == "uniform" else self._points_gaussian)(x, a, s)
        log_post, x0_k = self.components(x_t, t)
        x0 = (log_post.exp()[..., None] * x0_k).sum(1)
        if y is None:
            return x0
        y = y.to(x0.device).long()
        labelled = y < self.n_classes
        x0_y = x0_k[torch.arange(len(y), device=y.device), y.clamp(max=self.n_classes - 1)]
        return torch.where(labelled[:, None], x0_y, x0)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).double().expand(x_t.shape[0])
        x = x_t.flatten(1).double()
        x0 = self.x0_hat(x_t, t, y)
        s = self.path.sigma(t)[:, None]
        # at sigma = 0, x1 is independent of x_t = x0, so E[x1 | x_t] is the prior's mean, 0
        x1 = torch.where(s > 0, (x - self.path.alpha(t)[:, None] * x0) / torch.where(s > 0, s, 1), 0)
        return target(self.prediction, self.path, x0, x1, t, self.sigma_data).reshape(x_t.shape).to(x_t.dtype)

    def _mixture_gaussian(self, x, a, s):
        """log p(k | x_t) + const = log w_k N(x_t; a mu_k, C_k) with C_k = a^2 S_k + s^2 I, and
        E[x0 | x_t, k] = mu_k + a S_k C_k^-1 (x_t - a mu_k) (Gaussian conditioning)."""
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        cov = a[:, :, None, None] ** 2 * self.covs + s[:, :, None, None] ** 2 * eye  # (B, K, d, d)
        r = x[:, None] - a[:, :, None] * self.means  # (B, K, d)
        chol = torch.linalg.cholesky(cov)
        solved = torch.cholesky_solve(r[..., None], chol)  # C_k^-1 r
        log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_p = self.log_weights - 0.5 * (r[..., None] * solved).sum((-2, -1)) - 0.5 * log_det
        return log_p, self.means + a[:, :, None] * (self.covs @ solved)[..., 0]

    def _mixture_uniform(self, x, a, s):
        """x1 uniform on [-1, 1]^d: given k, x0 is N(mu_k, diag S_k) truncated to the box |x_t - a x0|_inf <= s;
        the unnormalised log p(k | x_t) and E[x0 | x_t, k]."""
        a = a.clamp_min(1e-6)  # alpha -> 0 (t = 1): the box covers (nearly) everything
        sd = self.covs.diagonal(dim1=-2, dim2=-1).sqrt()  # (K, d)
        lo, hi = ((x - s) / a)[:, None], ((x + s) / a)[:, None]  # (B, 1, d)
        log_z, mean = _truncated_normal((lo - self.means) / sd, (hi - self.means) / sd)
        return self.log_weights + log_z.sum(-1), self.means + sd * mean

    def _points_gaussian(self, x, a, s):
        """Softmax over points of log N(x_t; a x_i, s^2 I); as s -> 0 the nearest point."""
        p = self.points
        d2 = (x**2).sum(1, keepdim=True) - 2 * a * (x @ p.T) + a**2 * (p**2).sum(1)
        return torch.softmax(-d2.clamp_min(0) / (2 * s.clamp_min(1e-100) ** 2), 1) @ p

    def _points_uniform(self, x, a, s):
        """Average of the points whose box |x_t - a x_i|_inf <= s holds x_t; the nearest one if none does."""
        a = a.clamp_min(1e-12)
        dist = a * torch.cdist(x / a, self.points, p=float("inf"))  # |x_t - a x_i|_inf, (B, N)
        inside = dist <= s
        nearest = nn.functional.one_hot(dist.argmin(1), len(self.points)).bool()
        mask = torch.where(inside.any(1, keepdim=True), inside, nearest).double()
        return mask @ self.points / mask.sum(1, keepdim=True)
