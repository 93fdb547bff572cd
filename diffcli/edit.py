"""`diffcli edit`: inpaint, colorize, SDEdit, encode / decode / interpolate, or solve y = A x0 + sigma_y n with a
trained model; every task is a sampler over a projected or conditioned denoiser (diffcli/editing.py). Writes
edited.npz (inputs, masks or measurements, results) and edited.png (them side by side)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import DiffcliError, editing
from .guidance import CountNFE, condition
from .inputs import image_mask, read_inputs
from .loading import LoadedModel, load_model, pick_device
from .plots import save_edit_picture
from .ranges import check_ranges
from .runs import progress, write_npz
from .samplers import is_deterministic
from .sampling import Plan, batch_seed, plan

log = logging.getLogger("diffcli")

ODE_TASKS = ("encode", "decode", "interpolate")  # need a deterministic sampler: an invertible map


def run_edit(cfg: DictConfig, out_dir) -> dict:
    """Edit the inputs of cfg.input with cfg.ckpt as cfg.task says; writes edited.npz and edited.png into out_dir
    and returns what it wrote (arrays on the CPU)."""
    check_ranges(cfg)
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt, device, cfg.get("net_class"))
    x = read_inputs(cfg.input, model.shape, cfg.get("n"), cfg.task)
    run = plan(_with_n(cfg, len(x)), model, device)
    if cfg.get("label") is None and cfg.get("labels") is None:  # inputs of no stated class: the model's
        run = dataclasses.replace(run, labels=None)  # unconditional prediction, not sample's even spread of classes
    _check_task(cfg, model, run, len(x))
    masks = _masks(cfg, model, x)
    t0, parts = time.perf_counter(), []
    size = max(2, run.batch_size - run.batch_size % 2) if cfg.task == "interpolate" else run.batch_size
    with progress(len(x), cfg.task) as bar:
        for i, start in enumerate(range(0, len(x), size)):
            rows = slice(start, start + size)
            parts.append(_edit_batch(cfg, run, x[rows], None if masks is None else masks[rows], batch_seed(cfg.seed, i),
                                     None if run.labels is None else run.labels[rows]))
            bar(len(x[rows]))
    out = {"inputs": x} | {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "nfe"}
    if masks is not None:
        out["masks"] = masks
    nfe = sum(p["nfe"] for p in parts) // len(parts)
    _report(cfg, out, nfe, time.perf_counter() - t0, run)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_npz(out_dir / "edited.npz", {k: v.numpy() for k, v in out.items()} | {"nfe": nfe})
    save_edit_picture(_columns(cfg, out), out_dir / "edited.png", f"{cfg.task} with {run.description}")
    log.info("wrote %s and %s", out_dir / "edited.npz", out_dir / "edited.png")
    return out | {"nfe": nfe}


def _with_n(cfg: DictConfig, n: int) -> DictConfig:
    """cfg with n = the number of inputs (sampling.plan's n)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.n = n
    return cfg


def _check_task(cfg: DictConfig, model: LoadedModel, run: Plan, n: int) -> None:
    """One line for a task this model, sampler or input cannot do, before any work."""
    path, name = model.denoiser.path, run.sampler.func.__name__
    if cfg.task in ODE_TASKS and not is_deterministic(name, **run.sampler.keywords):
        raise DiffcliError(f"task={cfg.task} runs the probability-flow ODE and sampler={name} is stochastic: choose "
                           "a deterministic one, e.g. sampler=ddim eta=0, sampler=euler or sampler=heun")
    if cfg.task in ODE_TASKS and name in ("dpmpp_2m", "unipc") and path.alpha(run.grid[:1]).item() == 0:
        raise DiffcliError(f"task={cfg.task} with sampler={name} would end in log(alpha/sigma) = -inf at this model's "
                           "t = 1 (alpha = 0, a flow): use sampler=heun, euler, ddim eta=0, midpoint or rk4")
    if cfg.task == "dps" or (cfg.task == "inpaint" and cfg.method in ("repaint", "dps")):
        editing.need_gaussian(path, "task=dps" if cfg.task == "dps" else f"method={cfg.method}")
    if cfg.task == "colorize" and model.shape[0] != 3:
        raise DiffcliError(f"task=colorize colours gray images with a model of RGB images; this model's images have "
                           f"{model.shape[0]} channel(s)")
    if cfg.task == "interpolate" and n % 2:
        raise DiffcliError(f"task=interpolate goes between pairs of inputs (1st and 2nd, 3rd and 4th, ...); got {n} "
                           "inputs: give an even number (n= takes the first n)")
    if model.kind == "points" and (cfg.task == "colorize" or cfg.task == "dps" and cfg.operator != "mask"):
        raise DiffcliError(f"task={cfg.task} works on images; for 2D points use task=inpaint (NaN marks the unknown "
                           "coordinates)")


def _masks(cfg: DictConfig, model: LoadedModel, x: torch.Tensor) -> torch.Tensor | None:
    """The known coordinates of each input, (N, *shape) bool: for images those outside cfg.mask, for points those
    that are not NaN; None for tasks without a mask."""
    if cfg.task not in ("inpaint", "dps") or cfg.task == "dps" and cfg.operator != "mask":
        return None
    if model.kind == "points":
        if cfg.mask is not None:
            raise DiffcliError(f"mask={cfg.mask}: 2D inputs mark their unknown coordinates by NaN; drop mask=")
        return ~torch.isnan(x)
    spec = OmegaConf.to_container(cfg.mask) if OmegaConf.is_config(cfg.mask) else cfg.mask  # [x0, y0, x1, y1]
    known = ~image_mask("bottom" if spec is None else spec, model.shape)
    return known.expand(len(x), *model.shape)


def operator(cfg: DictConfig, known: torch.Tensor | None):
    """The measurement A of task=dps: mask (cfg.mask's pixels hidden), down<k> (k x k box averages) or blur."""
    name = cfg.operator
    if name == "mask":
        return editing.Masked(known)
    if name == "blur":
        return editing.Blur(9, 2.0)
    if name.startswith("down") and name[4:].isdigit() and int(name[4:]) > 1:
        return editing.BoxDown(int(name[4:]))
    raise DiffcliError(f"operator={name} is unknown; choose mask, blur or down<k> (k x k box averages, e.g. down4)")


def _edit_batch(cfg: DictConfig, run: Plan, x: torch.Tensor, known, seed: int, labels) -> dict:
    """One batch of the task, from its own generator (so a batch's result depends on its index alone)."""
    device = run.denoiser.device
    g = torch.Generator(device=device).manual_seed(seed)
    x = x.to(device)
    known = None if known is None else known.to(device)
    denoiser = CountNFE(condition(run.denoiser, None if labels is None else labels.to(device), **run.conditions))
    sampler, grid = run.sampler, run.grid.to(device)
    no_grad = torch.no_grad if cfg.task == "dps" or cfg.method == "dps" or "classifier" in run.conditions else \
        torch.inference_mode
    with no_grad():
        out = _TASKS[cfg.task](cfg, sampler, denoiser, x, known, grid, g)
    return {k: v.detach().float().cpu() for k, v in out.items()} | {"nfe": denoiser.nfe}


def _inpaint(cfg, sampler, denoiser, x, known, grid, g):
    x_known = torch.nan_to_num(x)
    if cfg.method == "replace":
        return {"results": editing.inpaint(sampler, denoiser, x_known, known, grid, g)}
    if cfg.method == "repaint":
        return {"results": editing.repaint(sampler, denoiser, x_known, known, grid, cfg.jump_length,
                                           cfg.jump_n_sample, g)}
    A = editing.Masked(known)
    return {"results": editing.dps(sampler, denoiser, A, A(x_known), x.shape, grid, cfg.scale, g)}


def _dps(cfg, sampler, denoiser, x, known, grid, g):
    A = operator(cfg, known)
    y = A(x)
    y = y + cfg.sigma_y * torch.randn(y.shape, generator=g, device=y.device, dtype=y.dtype)
    return {"measurements": y, "results": editing.dps(sampler, denoiser, A, y, x.shape, grid, cfg.scale, g)}


def _encode(cfg, sampler, denoiser, x, known, grid, g):
    z = editing.ode_encode(sampler, denoiser, x, grid)
    back = editing.ode_decode(sampler, denoiser, z, grid)
    return {"results": z, "round_trip_error": (back - x).flatten(1).abs().max(1).values}


def _interpolate(cfg, sampler, denoiser, x, known, grid, g):
    z_a, z_b = (editing.ode_encode(sampler, denoiser, v, grid) for v in (x[0::2], x[1::2]))
    weights = torch.linspace(0, 1, cfg.frames).tolist()
    frames = [editing.ode_decode(sampler, denoiser, editing.slerp(z_a, z_b, w), grid) for w in weights]
    return {"results": torch.stack(frames, 1)}  # (pairs, frames, *shape)


_TASKS = {
    "inpaint": _inpaint,
    "colorize": lambda cfg, sampler, d, x, known, grid, g: {"results": editing.colorize(sampler, d, x, grid, g)},
    "sdedit": lambda cfg, sampler, d, x, known, grid, g: {"results": editing.sdedit(sampler, d, x, cfg.strength,
                                                                                     grid, g)},
    "encode": _encode,
    "decode": lambda cfg, sampler, d, x, known, grid, g: {"results": editing.ode_decode(sampler, d, x, grid)},
    "interpolate": _interpolate,
    "dps": _dps,
}


def _report(cfg: DictConfig, out: dict, nfe: int, seconds: float, run: Plan) -> None:
    log.info("%s of %d inputs with %s: %d network evaluations (NFE) per input, %.1f s", cfg.task, len(out["inputs"]),
             run.description, nfe, seconds)
    if "round_trip_error" in out:
        err = out["round_trip_error"]
        log.info("encode-decode round trip: max |x - decode(encode(x))| = %.3g (median over inputs %.3g)",
                 err.max().item(), err.median().item())


def _columns(cfg: DictConfig, out: dict) -> list[tuple[str, torch.Tensor]]:
    """What edited.png shows side by side: input, mask or measurement, result(s)."""
    x = out["inputs"]
    if cfg.task == "interpolate":
        return [(f"{w:.2f}", out["results"][:, k]) for k, w in enumerate(torch.linspace(0, 1, cfg.frames).tolist())]
    columns = [("input", x)]
    if "masks" in out and x.dim() == 4:
        columns.append(("known", torch.where(out["masks"], x, 0.0)))  # the pixels to fill in gray
    if "measurements" in out:
        y = out["measurements"]
        if y.shape[-1] != x.shape[-1]:  # a down-sampled measurement, shown at the input's size
            y = torch.nn.functional.interpolate(y, size=x.shape[-2:], mode="nearest")
        columns.append((f"y = A x + {cfg.sigma_y:g} n", y.clamp(-1, 1)))
    columns.append(("noise" if cfg.task == "encode" else "result", out["results"]))
    return columns
