"""Largest pairwise Euclidean distance of a dataset, the sigma_max the score-SDE authors advise
(Song & Ermon 2020, Technique 1), in the model's space ([-1, 1] pixels; toy coordinates).

    python scripts/sigma_max.py data=eight_gaussians
    python scripts/sigma_max.py data=mnist data.root=../shared/data data.split=test data.download=false

Toys are measured on 20,000 fresh samples; image sets on every image the config loads.
"""

import sys

import torch
from hydra import compose, initialize_config_module
from rich.progress import track

from diffcli.data import build_data


@torch.no_grad()
def largest_pairwise_distance(x: torch.Tensor, chunk: int = 1024) -> float:
    """max_{i<j} ||x_i - x_j||, in chunks so that 60,000 images fit in memory."""
    x = x.flatten(1).double()
    best = 0.0
    for start in track(range(0, len(x), chunk), description="distances", transient=True):
        best = max(best, torch.cdist(x[start:start + chunk], x).max().item())
    return best


def main(overrides: list[str]) -> None:
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        cfg = compose("train", overrides=overrides)
    data = build_data(cfg.data, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = data.images.float() / 127.5 - 1 if data.is_image else data.sample(20_000, g)
    print(f"{cfg.data.name}: {len(x)} points, largest pairwise distance {largest_pairwise_distance(x):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
