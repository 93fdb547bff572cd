"""`diffcli sample`: rebuild a model from its checkpoint alone, sample, save samples.npz + a picture."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from . import DiffcliError
from .data import build_data
from .loading import load_model, pick_device
from .plots import save_field_picture, save_picture, save_trajectory_picture
from .sampling import SampleResult, draw
from .schema import check_ranges

log = logging.getLogger("diffcli")


def reference_data(train_cfg: DictConfig, n: int, seed: int) -> torch.Tensor | None:
    """Fresh samples of a 2D toy the model was trained on (None for images)."""
    data = build_data(train_cfg.data, torch.device("cpu"), seed=seed)
    return None if data.is_image else data.sample(n, torch.Generator().manual_seed(seed + 1))


def run_sample(cfg: DictConfig, out_dir) -> SampleResult:
    """Sample `cfg.n` points from `cfg.ckpt`; writes samples.npz and pictures into out_dir."""
    check_ranges(cfg)
    options = cfg.get("sample") or {}
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt, device, cfg.get("net_class"))
    out = draw(cfg, model, device, trajectory=bool(options.get("save_trajectory")))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": out.samples.numpy(), "nfe": out.nfe, "t_grid": out.grid.numpy()}
    if out.labels is not None:  # the requested class of every sample
        arrays["labels"] = out.labels.numpy()
    if out.trajectory is not None:
        frames = out.trajectory if model.kind == "points" else _thin(out.trajectory)
        arrays["trajectory"] = frames.numpy()
        save_trajectory_picture(frames, out_dir / "trajectories.png")
    np.savez(out_dir / "samples.npz", **arrays)
    reference = reference_data(model.config, len(out.samples), cfg.seed) if model.kind == "points" else None
    save_picture(out.samples, out_dir / "samples.png", reference, out.labels)
    if options.get("plot_field"):
        if reference is None:
            raise DiffcliError("sample.plot_field=true draws 2D fields; this model was trained on images")
        save_field_picture(model.denoiser, reference, out_dir / "field.png")
    log.info("wrote %s and pictures in %s (%s, NFE %d per sample)", out_dir / "samples.npz", out_dir, out.description,
             out.nfe)
    return out


def _thin(frames: torch.Tensor, max_frames: int = 21, max_samples: int = 16) -> torch.Tensor:
    """Image trajectories are large: keep a few samples at a few moments."""
    keep = torch.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().long()
    return frames[keep][:, :max_samples]
