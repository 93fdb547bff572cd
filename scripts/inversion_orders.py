"""Encode-decode round trips (DDIM inversion along any deterministic sampler, issue 28) on the exact oracle, and the
observed order of each sampler, as Markdown tables.

    python scripts/inversion_orders.py [--n 1000] [--seed 0] [--steps 10 20 40 80 160]

The data: n draws of the correlated three-component 2D mixture of tests/test_editing.py; the model: its exact
denoiser (the oracle: eps prediction on the VP path, velocity prediction on the flow path), so no training error
enters. ode_encode carries x, placed at the grid's smallest t > 0 (t_min = 1e-3), up the grid reversed to its top
(t = 1); ode_decode carries that back down to t_min. Per sampler and step count:

- round trip: max and RMS of |decode(encode(x)) - x| over the points' coordinates, and the observed order
  log2(e(N) / e(2N)) between successive step counts;
- encode error: max |ode_encode(x) - z|, z the probability-flow ODE's solution from t_min to 1 by adaptive dopri5 at
  tolerance 1e-10 (an independent solver), and its observed order: the sampler's own order of accuracy.

A one-step method's round trip is not its one-way error: a step up and the same step back cancel the leading local
error term when the order p is even (h^{p+1} (C + (-1)^{p+1} C)), so heun's and midpoint's round trips converge at
order 3 and rk4's at 5, while euler's (p = 1) stays at order 1. The encode error shows p itself.

A sampler that raises, or returns nan, is reported as failing, with its error. On the flow path t = 1 is alpha = 0,
where EDM's variables x / alpha and lambda = log(alpha / sigma) are infinite, so the flow is also run on a grid topped
at t = 0.999. Last, the round trip of adaptive dopri5 (editing.encode / decode and pf_ode) at tolerance 1e-9.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import torch

from diffcli.editing import decode, encode, ode_decode, ode_encode, pf_ode
from diffcli.guidance import CountNFE
from diffcli.hardware import cpu_name
from diffcli.oracle import Oracle
from diffcli.paths import FlowPath, VPPath
from diffcli.prediction import Denoiser
from diffcli.samplers import ddim, dopri5, dpmpp_2m, euler, heun, midpoint, rk4, uniform_grid, unipc
from diffcli.toys import gmm_mixture

GMM = {"means": [[-1.0, 0.5], [1.5, -0.5], [0.0, -1.5]],
       "covs": [[[0.3, 0.15], [0.15, 0.2]], [[0.1, -0.06], [-0.06, 0.25]], [[0.4, 0.1], [0.1, 0.08]]],
       "weights": [0.5, 0.3, 0.2]}
SAMPLERS = {"ddim": ddim, "euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m, "unipc": unipc, "midpoint": midpoint,
            "rk4": rk4, "dopri5": dopri5}  # dopri5 is adaptive (rtol = atol = 1e-5): its steps do not set its error
T_MIN = 1e-3


def machine() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"


def denoiser(path, prediction: str) -> Denoiser:
    net = Oracle((2,), {"kind": "toy", "name": "gmm", "params": GMM}, path, prediction)
    return Denoiser(net, path, prediction, "none", 0.5)


def draw(n: int, seed: int) -> torch.Tensor:
    means, covs, w = gmm_mixture(**GMM)
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(w, n, replacement=True, generator=g)
    return means[k] + (torch.linalg.cholesky(covs)[k] @ torch.randn(n, 2, 1, dtype=torch.float64, generator=g))[..., 0]


def grid(path, steps: int, top: float) -> torch.Tensor:
    """uniform_grid (steps intervals from 1 down to t_min, then 0), or the same uniform in t from `top` < 1."""
    if top == 1.0:
        return uniform_grid(path, steps, T_MIN)
    return torch.cat([torch.linspace(top, T_MIN, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def order(e_coarse: float, e_fine: float) -> str:
    if not (e_coarse > 0 and e_fine > 0):
        return ""
    return f"{math.log2(e_coarse / e_fine):.2f}"


def rows(d, x: torch.Tensor, z_ref: torch.Tensor, top: float, steps_list):
    """Print one table row per (sampler, steps) and return {sampler: failure or None}."""
    failures = {}
    for name, sampler in SAMPLERS.items():
        prev, failures[name] = None, None
        for steps in steps_list:
            counted, g = CountNFE(d), grid(d.path, steps, top)
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    z = ode_encode(sampler, counted, x, g)
                    back = ode_decode(sampler, counted, z, g)
            except Exception as e:  # noqa: BLE001 - a failing sampler is a result here
                failures[name] = f"{type(e).__name__}: {e}"
                print(f"| {name} | {steps} | - | fails: {failures[name]} | | | | | | |", flush=True)
                break
            seconds = time.perf_counter() - start
            if not torch.isfinite(back).all():
                where = "encoding" if not torch.isfinite(z).all() else "decoding"
                failures[name] = f"nan/inf after {where} ({int((~torch.isfinite(z)).any(1).sum())} of {len(x)} " \
                                 f"encodings not finite)"
                print(f"| {name} | {steps} | {counted.nfe} | fails: {failures[name]} | | | | | | |", flush=True)
                break
            err = back - x
            cur = (err.abs().max().item(), err.pow(2).mean().sqrt().item(), (z - z_ref).abs().max().item())
            o = [order(p, c) for p, c in zip(prev, cur)] if prev else ["", "", ""]
            print(f"| {name} | {steps} | {counted.nfe} | {cur[0]:.3e} | {cur[1]:.3e} | {o[0]} | {o[1]} | "
                  f"{cur[2]:.3e} | {o[2]} | {seconds:.2f} |", flush=True)
            prev = cur
    return failures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="data points (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80, 160])
    args = parser.parse_args(argv)
    total = time.perf_counter()
    print(f"machine: {machine()}; torch {torch.__version__}; n = {args.n} points, seed {args.seed}", flush=True)
    x = draw(args.n, args.seed)
    cases = [("VP, eps", VPPath(), "eps", 1.0), ("flow, velocity", FlowPath(), "velocity", 1.0),
             ("flow, velocity, grid topped at t = 0.999", FlowPath(), "velocity", 0.999)]
    failures = {}
    for title, path, prediction, top in cases:
        d = denoiser(path, prediction)
        z_ref = pf_ode(d, x, T_MIN, top, rtol=1e-10, atol=1e-10)
        print(f"\n{title}: uniform grid from t = {top} to {T_MIN} (then 0), data at t = {T_MIN}\n", flush=True)
        print("| sampler | steps | NFE (round trip) | round trip max | round trip RMS | order (max) | order (RMS) | "
              "encode error max | order (encode) | seconds |", flush=True)
        print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
        failures[title] = rows(d, x, z_ref, top, args.steps)

    print("\nadaptive dopri5, rtol = atol = 1e-9 both ways\n", flush=True)
    print("| path | call | NFE (round trip) | round trip max | round trip RMS | seconds |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    for title, path, prediction in [("VP, eps", VPPath(), "eps"), ("flow, velocity", FlowPath(), "velocity")]:
        counted = CountNFE(denoiser(path, prediction))
        calls = {f"pf_ode {T_MIN} -> 1 -> {T_MIN}": lambda: pf_ode(counted, pf_ode(counted, x, T_MIN, 1.0, 1e-9, 1e-9),
                                                                      1.0, T_MIN, 1e-9, 1e-9),
                 "editing.encode / decode (t = 0 -> 1 -> 0)": lambda: decode(counted, encode(counted, x, rtol=1e-9,
                                                                                               atol=1e-9),
                                                                            rtol=1e-9, atol=1e-9)}
        for call, fn in calls.items():
            counted.nfe, start = 0, time.perf_counter()
            try:
                err = fn() - x
            except Exception as e:  # noqa: BLE001
                print(f"| {title} | {call} | {counted.nfe} | fails: {type(e).__name__}: {e} | | |", flush=True)
                continue
            print(f"| {title} | {call} | {counted.nfe} | {err.abs().max().item():.3e} | "
                  f"{err.pow(2).mean().sqrt().item():.3e} | {time.perf_counter() - start:.2f} |", flush=True)

    print("\nfailing samplers:", flush=True)
    for title, fails in failures.items():
        for name, why in fails.items():
            if why:
                print(f"- {title}: {name}: {why}", flush=True)
    print(f"\n(total {time.perf_counter() - total:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
