"""Sample quality against network evaluations for every sampler, with the exact oracle on a 2D mixture.

    python scripts/bench_samplers.py [--n 10000] [--at-nfe 10 20] [--only heun unipc] [--out outputs/bench_samplers.png]

The denoiser is `net=oracle` (exact E[x0 | x_t]), so every difference is the sampler's own error. Quality is
the sliced Wasserstein distance to fresh data (the same reference set and initial noise for every budget).
Two tables:
  1. each sampler's curve over its budgets (steps; dopri5: -log10 tolerance; langevin: steps per level) and the
     NFE at which it first comes within 10% of its converged quality (the mean of its three largest budgets:
     stochastic samplers fluctuate at the noise floor);
  2. each sampler's quality at fixed NFE (--at-nfe, default 10 and 20), at the budget whose NFE is nearest;
     where no budget gives that NFE exactly (heun: 2 steps - 1, rk4: 4 steps, pc on VP: steps >= 20, dopri5:
     adaptive), the NFE actually used is printed beside the value.
"""

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from diffcli import DiffcliError
from diffcli.data import build_data
from diffcli.metrics import sliced_wasserstein
from diffcli.build import build_net, build_path
from diffcli.loading import model_denoiser
from diffcli.plots import pyplot
from diffcli.sampling import generate, sampler_from_config

STEPS = [2, 5, 10, 20, 50, 100, 200, 500, 1000]


def steps(sampler, *extra):
    return lambda k: [f"sampler={sampler}", f"steps={k}", *extra]


def tolerance(k):
    return ["sampler=dopri5", f"sampler.fn.rtol={10 ** (-k)}", f"sampler.fn.atol={10 ** (-k)}"]


RUNS = {  # label -> (model overrides, sampler overrides per budget k)
    "ancestral (vpsde)": (["model=vpsde"], steps("ancestral")),
    "ddim eta=0 (vpsde)": (["model=vpsde"], steps("ddim", "eta=0")),
    "ddim eta=1 (vpsde)": (["model=vpsde"], steps("ddim", "eta=1")),
    "euler_maruyama (vpsde)": (["model=vpsde"], steps("euler_maruyama")),
    "pc (vpsde)": (["model=vpsde"], steps("pc")),
    "euler (vpsde)": (["model=vpsde"], steps("euler")),
    "heun (vpsde)": (["model=vpsde"], steps("heun")),
    "dpmpp_2m (vpsde)": (["model=vpsde"], steps("dpmpp_2m")),
    "dpmpp_2m_sde (vpsde)": (["model=vpsde"], steps("dpmpp_2m_sde")),
    "dpmpp_3m_sde (vpsde)": (["model=vpsde"], steps("dpmpp_3m_sde")),
    "unipc (vpsde)": (["model=vpsde"], steps("unipc")),
    "dopri5 (vpsde)": (["model=vpsde"], tolerance),
    "langevin (ncsn)": (["model=ncsn"], lambda k: ["sampler=langevin", f"sampler.fn.n_steps={k}"]),
    "euler (flow)": (["model=flow"], steps("euler")),
    "heun (flow)": (["model=flow"], steps("heun")),
    "dpmpp_2m (flow)": (["model=flow"], steps("dpmpp_2m")),
    "dpmpp_2m_sde (flow)": (["model=flow"], steps("dpmpp_2m_sde")),
    "unipc (flow)": (["model=flow"], steps("unipc")),
    "midpoint (flow)": (["model=flow"], steps("midpoint")),
    "rk4 (flow)": (["model=flow"], steps("rk4")),
    "dopri5 (flow)": (["model=flow"], tolerance),
}
BUDGETS = {"dopri5 (vpsde)": [1, 2, 3, 4, 5, 6], "dopri5 (flow)": [1, 2, 3, 4, 5, 6],  # -log10 tolerance
           "langevin (ncsn)": [1, 2, 5, 10, 20, 50, 100]}  # steps per noise level


def compose_cfg(name, overrides):
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        return compose(name, overrides=overrides)


def oracle(model_overrides):
    cfg = compose_cfg("train", ["data=eight_gaussians", "net=oracle", *model_overrides])
    data = build_data(cfg.data, torch.device("cpu"))
    return model_denoiser(build_net(cfg.net, data.shape), build_path(cfg.model.path), cfg.model), data


def run(label, denoiser, k, n):
    """(NFE, samples) of `label` at budget k, or None where the sampler refuses that budget (pc on VP, steps < 20)."""
    cfg = compose_cfg("sample", RUNS[label][1](k))
    try:
        fn, grid = sampler_from_config(cfg.sampler, denoiser.path)
        out = generate(denoiser, fn, grid, n, (2,), batch_size=n, seed=0, device=torch.device("cpu"))
    except DiffcliError:
        return None
    return out.nfe, out.samples


def curve(label, n):
    """[(NFE, sliced W2)] over the label's budgets (refused budgets left out)."""
    denoiser, data = oracle(RUNS[label][0])
    reference = data.sample(n, torch.Generator().manual_seed(123))
    points = []
    for k in BUDGETS.get(label, STEPS):
        out = run(label, denoiser, k, n)
        if out is not None:
            points.append((out[0], sliced_wasserstein(out[1], reference)))
    return points


def budget_for_nfe(label, denoiser, target):
    """(k, NFE) with NFE nearest to target, probed on 2 samples (NFE grows with k and, but for dopri5's, does not
    depend on the samples); the lower one on a tie."""
    best = None
    for k in BUDGETS.get(label, range(1, 4 * target + 1)):
        out = run(label, denoiser, k, 2)
        if out is None:
            continue
        if best is None or abs(out[0] - target) < abs(best[1] - target):
            best = (k, out[0])
        if out[0] >= target:
            break
    return best


def at_nfe(label, n, targets):
    """{target: (NFE used, sliced W2)} at the budget nearest each target NFE (None where no budget runs)."""
    denoiser, data = oracle(RUNS[label][0])
    reference = data.sample(n, torch.Generator().manual_seed(123))
    if label.startswith("dopri5"):  # adaptive: the tolerance whose NFE on these n samples is nearest
        runs = [run(label, denoiser, k, n) for k in BUDGETS[label]]
        nearest = {target: min(runs, key=lambda r: abs(r[0] - target)) for target in targets}
        return {target: (nfe, sliced_wasserstein(x, reference)) for target, (nfe, x) in nearest.items()}
    result = {}
    for target in targets:
        best = budget_for_nfe(label, denoiser, target)
        if best is None:
            result[target] = None
            continue
        nfe, x = run(label, denoiser, best[0], n)
        result[target] = (nfe, sliced_wasserstein(x, reference))
    return result


def cell(value, target):
    if value is None:
        return "refuses"
    nfe, q = value
    return f"{q:.4f}" if nfe == target else f"{q:.4f} (NFE {nfe})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--out", default="outputs/bench_samplers.png")
    parser.add_argument("--only", nargs="*", default=None, help="run just the rows whose label contains one of these")
    parser.add_argument("--at-nfe", nargs="*", type=int, default=[10, 20],
                        help="the second table's NFE columns (none: skip it)")
    parser.add_argument("--no-curves", action="store_true", help="skip the first table and the plot")
    args = parser.parse_args()
    labels = [label for label in RUNS if not args.only or any(word in label for word in args.only)]
    data = oracle(["model=vpsde"])[1]
    g = torch.Generator().manual_seed(7)
    floor = sliced_wasserstein(data.sample(args.n, g), data.sample(args.n, g))
    print(f"oracle denoiser on eight_gaussians, n={args.n}; sliced W2 between two fresh data sets: {floor:.4f}\n")
    if not args.no_curves:
        print("| sampler | NFE: sliced W2 | converged | NFE within 10% |")
        print("|---|---|---|---|")
        curves = {}
        for label in labels:
            start = time.perf_counter()
            curves[label] = points = curve(label, args.n)
            converged = sum(q for _, q in points[-3:]) / 3
            within = next(nfe for nfe, q in points if q <= 1.1 * converged)
            series = ", ".join(f"{nfe}: {q:.3f}" for nfe, q in points)
            print(f"| {label} | {series} | {converged:.4f} | {within} |  <!-- {time.perf_counter() - start:.0f}s -->",
                  flush=True)
        plot(curves, floor, Path(args.out))
        print(f"\nplot: {args.out}\n")
    if args.at_nfe:
        print("| sampler | " + " | ".join(f"sliced W2 at NFE {t}" for t in args.at_nfe) + " |")
        print("|---" * (len(args.at_nfe) + 1) + "|")
        for label in labels:
            start = time.perf_counter()
            values = at_nfe(label, args.n, args.at_nfe)
            print(f"| {label} | " + " | ".join(cell(values[t], t) for t in args.at_nfe)
                  + f" |  <!-- {time.perf_counter() - start:.0f}s -->", flush=True)
        print("\n(NFE k): no budget of that sampler gives the column's NFE exactly; k is the nearest it runs")


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
