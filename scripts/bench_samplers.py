"""Sample quality against network evaluations for every sampler, with the exact oracle on a 2D mixture.

    python scripts/bench_samplers.py [--n 4000] [--out outputs/bench_samplers.png]

The denoiser is `net=oracle` (exact E[x0 | x_t]), so every difference is the sampler's own error.
Quality is the sliced Wasserstein distance to fresh data (the same reference set and initial noise for
every budget); the table says at what NFE each sampler first comes within 10% of its converged
quality (the mean of its three largest budgets: stochastic samplers fluctuate at the noise floor).
"""

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from diffcli.data import build_data
from diffcli.evaluate import sliced_wasserstein
from diffcli.prediction import Denoiser
from diffcli.sample import generate, pyplot, sampler_from_config

STEPS = [2, 5, 10, 20, 50, 100, 200, 500, 1000]
RUNS = {  # label -> (model overrides, sampler overrides per budget k)
    "ancestral (vpsde)": (["model=vpsde"], lambda k: ["sampler=ancestral", f"steps={k}"]),
    "ddim eta=0 (vpsde)": (["model=vpsde"], lambda k: ["sampler=ddim", f"steps={k}", "eta=0"]),
    "ddim eta=1 (vpsde)": (["model=vpsde"], lambda k: ["sampler=ddim", f"steps={k}", "eta=1"]),
    "euler_maruyama (vpsde)": (["model=vpsde"], lambda k: ["sampler=euler_maruyama", f"steps={k}"]),
    "pc (vpsde)": (["model=vpsde"], lambda k: ["sampler=pc", f"steps={k}"]),
    "euler (vpsde)": (["model=vpsde"], lambda k: ["sampler=euler", f"steps={k}"]),
    "heun (vpsde)": (["model=vpsde"], lambda k: ["sampler=heun", f"steps={k}"]),
    "dpmpp_2m (vpsde)": (["model=vpsde"], lambda k: ["sampler=dpmpp_2m", f"steps={k}"]),
    "dopri5 (vpsde)": (["model=vpsde"], lambda k: ["sampler=dopri5", f"sampler.fn.rtol={10 ** (-k)}",
                                                   f"sampler.fn.atol={10 ** (-k)}"]),
    "langevin (ncsn)": (["model=ncsn"], lambda k: ["sampler=langevin", f"sampler.fn.n_steps={k}"]),
    "euler (flow)": (["model=flow"], lambda k: ["sampler=euler", f"steps={k}"]),
    "heun (flow)": (["model=flow"], lambda k: ["sampler=heun", f"steps={k}"]),
    "midpoint (flow)": (["model=flow"], lambda k: ["sampler=midpoint", f"steps={k}"]),
    "rk4 (flow)": (["model=flow"], lambda k: ["sampler=rk4", f"steps={k}"]),
    "dopri5 (flow)": (["model=flow"], lambda k: ["sampler=dopri5", f"sampler.fn.rtol={10 ** (-k)}",
                                                 f"sampler.fn.atol={10 ** (-k)}"]),
}
BUDGETS = {"dopri5 (vpsde)": [1, 2, 3, 4, 5, 6], "dopri5 (flow)": [1, 2, 3, 4, 5, 6],  # -log10 tolerance
           "langevin (ncsn)": [1, 2, 5, 10, 20, 50, 100]}  # steps per noise level


def compose_cfg(name, overrides):
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        return compose(name, overrides=overrides)


def oracle(model_overrides):
    cfg = compose_cfg("train", ["data=eight_gaussians", "net=oracle", *model_overrides])
    data = build_data(cfg.data, torch.device("cpu"))
    net = instantiate(cfg.net, shape=data.shape)
    return Denoiser(net, instantiate(cfg.model.path), cfg.model.prediction), data


def curve(label, n):
    model_overrides, sampler_overrides = RUNS[label]
    denoiser, data = oracle(model_overrides)
    reference = data.sample(n, torch.Generator().manual_seed(123))
    points = []
    for k in BUDGETS.get(label, STEPS):
        cfg = compose_cfg("sample", sampler_overrides(k))
        fn, grid = sampler_from_config(cfg.sampler, denoiser.path)
        denoiser.nfe = 0
        x = generate(denoiser, fn, grid, n, (2,), batch_size=n, seed=0, device=torch.device("cpu"))
        points.append((denoiser.nfe, sliced_wasserstein(x, reference)))
    return points


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--out", default="outputs/bench_samplers.png")
    parser.add_argument("--only", nargs="*", default=None, help="run just the rows whose label contains one of these")
    args = parser.parse_args()
    data = oracle(["model=vpsde"])[1]
    g = torch.Generator().manual_seed(7)
    floor = sliced_wasserstein(data.sample(args.n, g), data.sample(args.n, g))
    print(f"oracle denoiser on eight_gaussians, n={args.n}; sliced W2 between two fresh data sets: {floor:.4f}\n")
    print("| sampler | NFE: sliced W2 | converged | NFE within 10% |")
    print("|---|---|---|---|")
    curves = {}
    for label in RUNS:
        if args.only and not any(word in label for word in args.only):
            continue
        start = time.perf_counter()
        curves[label] = points = curve(label, args.n)
        converged = sum(q for _, q in points[-3:]) / 3
        within = next(nfe for nfe, q in points if q <= 1.1 * converged)
        series = ", ".join(f"{nfe}: {q:.3f}" for nfe, q in points)
        print(f"| {label} | {series} | {converged:.4f} | {within} |  <!-- {time.perf_counter() - start:.0f}s -->",
              flush=True)
    plot(curves, floor, Path(args.out))
    print(f"\nplot: {args.out}")


def plot(curves, floor, file):
    plt = pyplot()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, points in curves.items():
        nfe, q = zip(*points)
        ax.plot(nfe, q, marker="o", ms=3, label=label, ls="--" if "flow" in label else "-")
    ax.axhline(floor, c="k", lw=0.8, ls=":", label="two fresh data sets")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", ylabel="sliced Wasserstein to data",
           title="sampler error with the exact oracle (eight_gaussians)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
