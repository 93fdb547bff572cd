"""How far inpainting's samples lie from the exact posterior, against network evaluations (issue 28), as one
Markdown table.

    python scripts/edit_posterior_table.py [--n 4000] [--seed 0] [--quick]

The data: the correlated three-component 2D Gaussian mixture of tests/test_editing.py; the model: its exact
denoiser (the oracle, eps prediction on the VP path), so no training error enters. The observation: x[0] = y
exactly (mask [True, False]) at a few y where p(x[1] | x[0] = y) is bimodal or skewed. The truth: that posterior in
closed form (gmm_posterior with sigma_y = 0), whose x[1] marginal is a 1D Gaussian mixture. The distance: the
Kolmogorov-Smirnov statistic sup |F_n - F| of the n chains' x[1] against its CDF, averaged over the y; the noise
floor is the mean KS of n exact draws, what a perfect sampler would score.

NFE is network evaluations per sample (CountNFE; every chain of a batch is evaluated at once). "x[0] RMS" is the
root mean square of x[0] - y: 0 for replacement and RePaint, which set it, not for DPS, which only pulls towards it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from scipy import stats

from diffcli.editing import Matrix, dps, gmm_posterior, inpaint, repaint
from diffcli.guidance import CountNFE
from diffcli.hardware import cpu_name
from diffcli.oracle import Oracle
from diffcli.paths import VPPath
from diffcli.prediction import Denoiser
from diffcli.samplers import ancestral, uniform_grid
from diffcli.toys import gmm_mixture

GMM = {"means": [[-1.0, 0.5], [1.5, -0.5], [0.0, -1.5]],
       "covs": [[[0.3, 0.15], [0.15, 0.2]], [[0.1, -0.06], [-0.06, 0.25]], [[0.4, 0.1], [0.1, 0.08]]],
       "weights": [0.5, 0.3, 0.2]}
# p(x[1] | x[0] = y): y = -0.5 two modes 0.72 / 0.28 at 0.75 and -1.62; y = 0 two modes 0.35 / 0.65 at 1.00 and
# -1.50; y = 1 modes 0.75 / 0.25 at -0.20 and -1.25 that overlap (a skewed, shouldered density)
YS = (-0.5, 0.0, 1.0)
A = [[1.0, 0.0]]


def machine() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"


def denoiser() -> Denoiser:
    path = VPPath()
    return Denoiser(Oracle((2,), {"kind": "toy", "name": "gmm", "params": GMM}, path, "eps"), path, "eps", "none", 0.5)


def posterior_x1(y: float):
    """(weights, means, standard deviations) of the 1D mixture p(x[1] | x[0] = y), numpy."""
    means, covs, w = gmm_mixture(**GMM)
    log_w, m, S = gmm_posterior(means, covs, w.log(), torch.tensor(A), torch.tensor([y]), 0.0)
    return log_w.exp().numpy(), m[:, 1].numpy(), S[:, 1, 1].sqrt().numpy()


def mixture_cdf(weights, means, stds):
    return lambda x: (weights * stats.norm.cdf((np.asarray(x)[..., None] - means) / stds)).sum(-1)


def ks(samples: torch.Tensor, cdf) -> float:
    return float(stats.kstest(samples.numpy(), cdf).statistic)


def noise_floor(ys, n: int, repeats: int, seed: int) -> float:
    """The mean KS of n exact draws of p(x[1] | x[0] = y) against its own CDF, over the y and `repeats` draws."""
    rng, out = np.random.default_rng(seed), []
    for y in ys:
        w, m, s = posterior_x1(y)
        cdf = mixture_cdf(w, m, s)
        for _ in range(repeats):
            k = rng.choice(len(w), size=n, p=w / w.sum())
            out.append(stats.kstest(m[k] + s[k] * rng.standard_normal(n), cdf).statistic)
    return float(np.mean(out))


def run_method(edit, ys, n: int, seed: int):
    """edit(counted denoiser, x_known, y tensor (n, 1), generator) -> samples (n, 2), at each y: (NFE per sample,
    KS per y, RMS of x[0] - y over all y, seconds)."""
    kss, err2, nfe, start = [], [], None, time.perf_counter()
    for i, y in enumerate(ys):
        counted = CountNFE(denoiser())
        x_known = torch.zeros(n, 2, dtype=torch.float64)
        x_known[:, 0] = y
        g = torch.Generator().manual_seed(seed * 1000 + i)
        out = edit(counted, x_known, x_known[:, :1].clone(), g)
        if nfe is not None and counted.nfe != nfe:
            raise RuntimeError(f"NFE differs between observations: {nfe} and {counted.nfe}")
        nfe = counted.nfe
        kss.append(ks(out[:, 1], mixture_cdf(*posterior_x1(y))))
        err2.append(((out[:, 0] - y) ** 2).mean().item())
    return nfe, kss, math.sqrt(sum(err2) / len(err2)), time.perf_counter() - start


def methods(quick: bool):
    """(method, settings, edit) for every row of the table."""
    mask = torch.tensor([True, False])
    op = Matrix(torch.tensor(A, dtype=torch.float64))
    grid = lambda steps: uniform_grid(VPPath(), steps)  # noqa: E731
    rows = []
    for steps in ((25, 100, 400) if quick else (25, 50, 100, 200, 400)):
        rows.append(("replacement", f"ancestral, {steps} steps",
                     lambda d, xk, y, g, steps=steps: inpaint(ancestral, d, xk, mask, grid(steps), g)))
    for steps in ((50,) if quick else (50, 100)):
        for r in ((2, 10) if quick else (2, 5, 10)):
            rows.append(("RePaint", f"ancestral, {steps} steps, jump 10, r={r}",
                         lambda d, xk, y, g, steps=steps, r=r: repaint(ancestral, d, xk, mask, grid(steps), 10, r, g)))
    for steps in ((100,) if quick else (100, 400)):
        for scale in ((0.3,) if quick else (0.1, 0.3, 1.0)):
            rows.append(("DPS", f"ancestral, {steps} steps, scale {scale}",
                         lambda d, xk, y, g, steps=steps, scale=scale: dps(ancestral, d, op, y, xk.shape, grid(steps),
                                                                          scale, g)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="chains per observed value (default 4000; --quick 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer settings and 1000 chains: a smoke run")
    args = parser.parse_args(argv)
    n = args.n or (1000 if args.quick else 4000)
    total = time.perf_counter()
    print(f"machine: {machine()}; torch {torch.__version__}; n = {n} chains per y, seed {args.seed}", flush=True)
    for y in YS:
        w, m, s = posterior_x1(y)
        print(f"exact p(x[1] | x[0] = {y}): " + ", ".join(f"{a:.3f} N({b:.2f}, {c:.3f}^2)" for a, b, c in zip(w, m, s)
                                                         if a > 1e-3), flush=True)
    floor = noise_floor(YS, n, 50, args.seed)
    print(f"noise floor: mean KS of {n} exact draws = {floor:.4f} (asymptotically 0.8687/sqrt(n) = "
          f"{0.8687 / math.sqrt(n):.4f})\n", flush=True)
    ks_cols = " | ".join(f"KS y={y}" for y in YS)
    print(f"| method | settings | NFE | mean KS | {ks_cols} | x[0] RMS | seconds |", flush=True)
    print("|---|---|---|---|" + "---|" * len(YS) + "---|---|", flush=True)
    for name, settings, edit in methods(args.quick):
        nfe, kss, err, seconds = run_method(edit, YS, n, args.seed)
        cells = " | ".join(f"{k:.4f}" for k in kss)
        print(f"| {name} | {settings} | {nfe} | {np.mean(kss):.4f} | {cells} | {err:.3g} | {seconds:.1f} |", flush=True)
    print(f"\n(total {time.perf_counter() - total:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
