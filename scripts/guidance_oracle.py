"""Class adherence against the guidance weight w on the exact oracle (no training error): two overlapping
Gaussian classes, sampled by 30-step heun under classifier-free guidance, as one Markdown table.

    python scripts/guidance_oracle.py

Adherence is the share of samples whose most probable class under the data's own mixture is the requested
one; the spread is the samples' standard deviation along the axis joining the two means (the data's: 0.5).
CFG does not sample the tilted density p(x | y)^w p(x)^(1-w); the table shows what it does instead.
"""

import torch

from diffcli.toys import gmm
from diffcli.oracle import Oracle
from diffcli.paths import FlowPath, VPPath
from diffcli.guidance import condition
from diffcli.prediction import Denoiser
from diffcli.samplers import heun, karras_grid

CLOSE = {"kind": "toy", "name": "gmm", "params": {"means": [[-0.4, 0.0], [0.4, 0.0]],
                                                  "covs": [[[0.25, 0.0], [0.0, 0.25]]] * 2, "weights": [0.5, 0.5]}}
WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)


def adherence(path, w: float, n: int = 4000) -> tuple[float, float]:
    """(share of samples in their class, the spread of class 1's samples along x) at guidance w."""
    oracle = Oracle((2,), CLOSE, path, "x0")
    labels = torch.arange(2).repeat(n // 2)
    d = condition(Denoiser(oracle, path, "x0"), labels, guidance=w)
    ts = karras_grid(path, 30).double()
    x = heun(d, path, torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
             * path.sigma(ts[0]), ts)
    posterior = oracle.log_class_probs(x, torch.zeros(n, dtype=torch.float64))
    return (posterior.argmax(1) == labels).double().mean().item(), x[labels == 1, 0].std().item()


def main() -> None:
    paths = {"vpsde": VPPath(), "flow": FlowPath()}
    print("| w | " + " | ".join(f"{name}: adherence | {name}: spread" for name in paths) + " |")
    print("|---|" + "---|---|" * len(paths))
    for w in WEIGHTS:
        cells = [f"{a:.3f} | {s:.3f}" for a, s in (adherence(p, w) for p in paths.values())]
        print(f"| {w} | " + " | ".join(cells) + " |")
    print("(exact class posterior of the data: the Bayes classifier's accuracy on real data is "
          f"{bayes_accuracy():.3f})")


def bayes_accuracy(n: int = 200000) -> float:
    """How often the data's most probable class (the oracle's p(y | x) at t = 0) is the class a point came from."""
    x, y = gmm(n, generator=torch.Generator().manual_seed(1), device="cpu", return_labels=True, **CLOSE["params"])
    posterior = Oracle((2,), CLOSE, VPPath(), "x0").log_class_probs(x.double(), torch.zeros(n, dtype=torch.float64))
    return (posterior.argmax(1) == y).double().mean().item()


if __name__ == "__main__":
    main()
