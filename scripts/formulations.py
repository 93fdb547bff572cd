"""Every formulation on eight_gaussians with net=mlp at one step budget: CPU training time and the
mode coverage of samples from its default sampler, as one Markdown table.

    python scripts/formulations.py            # 2000 steps each
    python scripts/formulations.py 5000
    python scripts/formulations.py 2000 edm "vpsde, EDM preconditioning"    # only these rows
"""

import sys
import tempfile
import time

import torch
from hydra import compose, initialize_config_module

from diffcli.toys import eight_gaussians_modes
from diffcli.loading import load_model
from diffcli.metrics import sliced_wasserstein
from diffcli.sampling import draw
from diffcli.scoring import mode_coverage
from diffcli.train import run_train

RUNS = {  # label -> overrides
    "ddpm": ["model=ddpm"],
    "ncsn": ["model=ncsn"],
    "vesde": ["model=vesde"],
    "vpsde": ["model=vpsde"],
    "subvpsde": ["model=subvpsde"],
    "vpsde, likelihood weighting": ["model=vpsde", "model.weighting=likelihood"],
    "vpsde, fourier time": ["model=vpsde", "net.time_embedding=fourier"],
    "flow": ["model=flow"],
    "flow, uniform prior": ["model=flow", "model.prior=uniform"],
    "flow, OT coupling": ["model=flow", "model.coupling=ot"],
    "edm": ["model=edm"],
    "vpsde, EDM preconditioning": ["model=vpsde", "model.precond=edm", "model.prediction=F",
                                   "model.times.dist=lognormal", "model.weighting=simple"],
}


def compose_cfg(name, overrides):
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        return compose(name, overrides=overrides)


def measure(overrides, steps: int, n: int = 2000) -> dict:
    out = tempfile.mkdtemp()
    cfg = compose_cfg("train", ["data=eight_gaussians", f"train.steps={steps}", "train.sample_every=0",
                                "train.log_every=500", "device=cpu", *overrides])
    start = time.perf_counter()
    run_train(cfg, out)
    seconds = time.perf_counter() - start
    result = draw(compose_cfg("sample", [f"ckpt={out}", f"n={n}", f"batch_size={n}", "device=cpu"]),
                  load_model(str(out), torch.device("cpu")), torch.device("cpu"))
    modes, std = eight_gaussians_modes()
    reference = torch.randn(n, 2, generator=torch.Generator().manual_seed(1)) * std + modes[
        torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(2))]
    coverage = mode_coverage(result.samples, modes, std)
    return {"seconds": seconds, "sampler": cfg.model.sampler, "nfe": result.nfe,
            "covered": coverage["modes_covered"], "in_modes": coverage["in_modes"],
            "swd": sliced_wasserstein(result.samples, reference)}


def main(steps: int, labels: list[str]) -> None:
    print(f"| formulation | train {steps} steps (s) | sampler (NFE) | modes covered | samples within 4 std | sliced W2 |")
    print("|---|---|---|---|---|---|")
    for label, overrides in RUNS.items():
        if labels and label not in labels:
            continue
        r = measure(overrides, steps)
        print(f"| {label} | {r['seconds']:.1f} | {r['sampler']} ({r['nfe']}) | {r['covered']}/8 | "
              f"{100 * r['in_modes']:.1f}% | {r['swd']:.3f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, sys.argv[2:])
