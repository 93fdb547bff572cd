"""The toy figures of docs/guides/distillation.md (issue 30): the exact oracle of eight_gaussians as teacher, its
2-reflow and its consistency distillation, side by side in one run: sliced Wasserstein at 1, 2 and 4 NFE against the
teacher's Euler at the same NFE and its dopri5, the straightness of each ODE, consistency's MSE to the teacher's
ODE endpoint from the same noise, and the wall time of each distillation. The setups of tests/test_distill.py.

    python scripts/distill_toys.py [--steps 1500] [--out /tmp/distill_toys]     # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from diffcli.distill import run_distill
from diffcli.hardware import cpu_name
from diffcli.likelihood import straightness
from diffcli.loading import load_model
from diffcli.metrics import sliced_wasserstein
from diffcli.samplers import consistency, dopri5, euler, linear_grid
from diffcli.toys import eight_gaussians
from diffcli.train import run_train

CPU = torch.device("cpu")
QUIET = ["train.sample_every=0", "train.eval_every=0", "train.log_every=500", "device=cpu"]


def compose_cfg(name, overrides):
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        return compose(name, overrides=overrides)


def distil(out: Path, teacher: Path, name: str, *args) -> tuple:
    """A student of the teacher and the wall time of its distillation (pairs included)."""
    t0 = time.perf_counter()
    run_distill(compose_cfg("distill", [f"teacher={teacher}", "net=mlp", *QUIET, *args]), out / name)
    return load_model(str(out / name), CPU), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path("/tmp/distill_toys"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    teacher = args.out / "teacher"
    run_train(compose_cfg("train", ["data=eight_gaussians", "model=flow", "net=oracle", "device=cpu"]), teacher)
    oracle = load_model(str(teacher), CPU).denoiser
    steps = f"train.steps={args.steps}"
    reflow, t_reflow = distil(args.out, teacher, "reflow", "sampler=dopri5", "reflow.n=4000", steps)
    cm, t_cm = distil(args.out, teacher, "consistency", "method=consistency", steps)
    reference = eight_gaussians(4000, generator=torch.Generator().manual_seed(5), device=CPU)
    x1 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(6))
    sw = lambda x: sliced_wasserstein(x.float(), reference)  # noqa: E731
    rows = []
    with torch.no_grad():
        exact = dopri5(oracle, oracle.path, x1.double(), torch.tensor([1.0, 1e-3, 0.0], dtype=torch.float64))
        rows.append(("teacher (exact oracle)", "dopri5", "adaptive", sw(exact), ""))
        t_top = float(cm.config.model.sampler_options.grid.t_max)
        for k in (1, 2, 4):
            rows.append(("teacher", "euler", k, sw(euler(oracle, oracle.path, x1.double(), linear_grid(oracle.path, k))),
                         ""))
            rows.append(("2-reflow", "euler", k, sw(euler(reflow.denoiser, reflow.denoiser.path, x1,
                                                          linear_grid(reflow.denoiser.path, k))), f"{t_reflow:.0f} s"))
            grid = linear_grid(cm.denoiser.path, k, t_top)
            sigma = cm.denoiser.path.sigma(torch.tensor(t_top)).float()
            rows.append(("consistency", "consistency", k, sw(consistency(
                cm.denoiser, cm.denoiser.path, x1 * sigma, grid, generator=torch.Generator().manual_seed(7))),
                f"{t_cm:.0f} s"))
        s_teacher = straightness(oracle, x1[:1000].double(), 100).mean().item()
        s_reflow = straightness(reflow.denoiser, x1[:1000], 100).mean().item()
        x = x1.double() * oracle.path.sigma(torch.tensor(t_top, dtype=torch.float64))
        endpoint = dopri5(oracle, oracle.path, x, torch.tensor([t_top, 1e-3, 0.0], dtype=torch.float64))
        mse = (cm.denoiser(x.float(), torch.tensor(t_top)).double() - endpoint).pow(2).sum(1).mean().item()
    variance = eight_gaussians(20000, generator=torch.Generator().manual_seed(8), device=CPU).var(0).sum().item()
    print(cpu_name())
    print("| model | sampler | NFE | sliced Wasserstein | distillation time |\n|---|---|---|---|---|")
    for name, sampler, nfe, value, wall in rows:
        print(f"| {name} | {sampler} | {nfe} | {value:.3f} | {wall} |")
    print(f"\nstraightness: teacher {s_teacher:.3f}, 2-reflow {s_reflow:.4f} (ratio {s_reflow / s_teacher:.4f}); "
          f"consistency 1 step vs the teacher's ODE endpoint: MSE {mse:.4f} = {mse / variance:.2%} of the data "
          f"variance {variance:.2f}")


if __name__ == "__main__":
    main()
