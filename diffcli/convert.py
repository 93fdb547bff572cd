"""`diffcli import FOLDER [out=DIR] [null_class=K] [data=NAME]` and `diffcli export CKPT FOLDER`: a diffusers folder
as a diffcli checkpoint, and a diffcli DDPM model as a folder that DDPMPipeline / DDIMPipeline load
(diffcli/diffusers_format.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import DiffcliError, diffusers_format
from .checkpoint import save_ema
from .loading import load_model
from .runs import atomic_folder

log = logging.getLogger("diffcli")
CPU = torch.device("cpu")


def run_import(folder: str, out: str | None = None, null_class: int | None = None, data: str | None = None) -> Path:
    """An ordinary diffcli run folder (checkpoints/ema_0.safetensors) of a diffusers folder; returns its file."""
    if not diffusers_format.is_folder(folder):
        raise DiffcliError(f"{folder} is not a diffusers folder (model_index.json, or unet/ and scheduler/); "
                           "give the folder a pipeline's save_pretrained wrote")
    state, cfg, step, shape = diffusers_format.read_folder(folder, null_class, data)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = Path(out) if out else Path("outputs/import") / f"{Path(folder).resolve().name}_{stamp}"
    with atomic_folder(out_dir, "an import") as tmp:
        (tmp / "checkpoints").mkdir()
        save_ema(tmp / "checkpoints" / "ema_0.safetensors", state, cfg, step, shape)
        load_model(str(tmp), CPU)  # the network builds and its weights fit, before the folder appears
    return out_dir / "checkpoints" / "ema_0.safetensors"


def run_export(ckpt: str, folder: str) -> Path:
    """A DDPMPipeline / DDIMPipeline folder of a diffcli model (or of an imported diffusers one)."""
    model = load_model(ckpt, CPU)
    path = model.denoiser.path
    scheduler = diffusers_format.scheduler_config(model.config.model, path)
    unet_config, state = diffusers_format.unet_files(model.denoiser.net, path.T, model.n_classes)
    diffusers_format.write_folder(Path(folder), unet_config, state, scheduler)
    return Path(folder)
