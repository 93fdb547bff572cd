"""`diffcli eval`: sample a checkpoint and score the samples against fresh data (2D toys for now)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path as FsPath

import torch
from omegaconf import DictConfig

from . import DiffcliError
from .data import build_data
from .sample import sample_checkpoint, save_picture

log = logging.getLogger("diffcli")


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size point sets (Rabin et al. 2011)."""
    if len(x) != len(y):
        raise ValueError("sliced_wasserstein needs sets of equal size")
    theta = torch.randn(x.shape[1], n_proj, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    px, py = (x.double() @ theta).sort(dim=0).values, (y.double() @ theta).sort(dim=0).values
    return math.sqrt((px - py).square().mean().item())


def mode_coverage(x: torch.Tensor, modes: torch.Tensor, std: float, min_share: float = 0.25) -> dict:
    """Mixture modes that received at least `min_share` of their expected share of samples.

    A sample counts for its nearest mode only when it lies within 4 std of it (else it is an
    off-manifold sample and counts against `in_modes`).
    """
    d = torch.cdist(x.double(), modes.double())
    dist, nearest = d.min(dim=1)
    close = dist < 4 * std
    counts = torch.bincount(nearest[close], minlength=len(modes))
    expected = len(x) / len(modes)
    return {"modes_covered": int((counts >= min_share * expected).sum()), "modes_total": len(modes),
            "in_modes": close.double().mean().item(), "mode_counts": counts.tolist()}


def toy_metrics(samples: torch.Tensor, reference: torch.Tensor, data) -> dict:
    """Sliced Wasserstein to fresh data of the same size, and mode coverage for mixtures."""
    metrics = {"sliced_wasserstein": sliced_wasserstein(samples, reference)}
    if getattr(data, "modes", None) is not None:
        metrics |= mode_coverage(samples, data.modes.cpu(), data.mode_std)
    return metrics


def run_eval(cfg: DictConfig, out_dir) -> dict:
    """Writes metrics.json and samples.png into out_dir and prints the metrics."""
    out = sample_checkpoint(cfg)
    if len(out["shape"]) != 1:
        raise DiffcliError("diffcli eval scores 2D toy data so far; image metrics (FID/KID) are not available yet")
    out_dir = FsPath(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = build_data(out["train_cfg"].data, torch.device("cpu"), seed=cfg.seed)
    reference = data.sample(cfg.n, torch.Generator().manual_seed(cfg.seed + 1))  # as reference_data draws
    record = {key: out[key] for key in ("ckpt", "step", "steps", "nfe")} | {
        "n": cfg.n, "seed": cfg.seed, "metrics": toy_metrics(out["samples"], reference, data)}
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    save_picture(out["samples"], out_dir / "samples.png", reference)
    _print_table(record)
    return record


def _print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{record['ckpt']} (step {record['step']}, n={record['n']}, NFE {record['nfe']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in record["metrics"].items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
