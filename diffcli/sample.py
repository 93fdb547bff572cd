"""`diffcli sample`: rebuild a model from its checkpoint alone, sample, save samples.npz + a picture."""

from __future__ import annotations

import logging
import math
from pathlib import Path as FsPath

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import DiffcliError
from .build import CLASSIFIERS, build_grid, build_net, build_path, build_sampler_fn, path_arguments
from .checkpoint import find_ema, load_ema, load_weights
from .prediction import Denoiser, NoisyClassifier
from .samplers import check_sampler
from .schema import check_ranges

log = logging.getLogger("diffcli")
DEFAULT_N = {"points": 2000, "images": 64}  # `diffcli sample` without n=: a readable scatter, an 8x8 grid


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DiffcliError(f"device={name} is not a device; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffcliError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DiffcliError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise DiffcliError(f"device={name}: diffcli runs on cpu or cuda; use device=auto, cpu or cuda")
    return device


def load_model(ckpt: str | None, device: torch.device, net_class: str | None = None):
    """(denoiser, train_cfg, step, shape, file) rebuilt from an EMA checkpoint with diffcli's own classes.

    The stored config only fills in arguments: a network class of the user's own must be named on
    the command line (`net_class=`), never taken from the file.
    """
    file = find_ema(ckpt)
    if ckpt is None:
        log.info("no ckpt given: using the newest training run, %s", file)
    state, train_cfg, step, shape = load_ema(file)
    if train_cfg.net.get("_target_") in CLASSIFIERS:
        raise DiffcliError(f"ckpt={file} is a noise-conditional classifier, which guides a model but cannot sample: "
                           f"give a model's checkpoint as ckpt= and this one as classifier={file}")
    net, path = _net_and_path(file, state, train_cfg, shape, model_classes(train_cfg.model), net_class)
    return model_denoiser(net.to(device).eval(), path, train_cfg.model), train_cfg, step, shape, file


def _net_and_path(file, state: dict, cfg: DictConfig, shape, n_classes: int, net_class: str | None = None):
    """The network (its weights loaded) and the path that a checkpoint's stored config describes; errors name the
    file."""
    try:
        net = build_net(cfg.net, shape, user_class=net_class, n_classes=n_classes)
        load_weights(net, state, "its weights")
        return net, build_path(cfg.model.path)
    except DiffcliError as e:
        raise DiffcliError(f"{file}: {e}") from None


def _check_companion(role: str, file, cfg: DictConfig, shape, train_cfg: DictConfig, model_shape, fix: str) -> None:
    """A guide or a classifier must share the model's data shape and path, so that its t means the model's t."""
    if tuple(shape) != tuple(model_shape) or path_arguments(cfg.model.path) != path_arguments(train_cfg.model.path):
        name = lambda c: c.model.path._target_.rsplit(".", 1)[-1]  # noqa: E731
        raise DiffcliError(f"{role}={file} was trained on {cfg.data.name} {tuple(shape)} with path {name(cfg)}, the "
                           f"model on {train_cfg.data.name} {tuple(model_shape)} with {name(train_cfg)}: {fix}")


def load_classifier(ckpt: str, device: torch.device, train_cfg: DictConfig, shape) -> NoisyClassifier:
    """Classifier guidance's p_t(y | x_t): a classifier checkpoint (diffcli train net=unet_classifier or
    mlp_classifier) trained on the model's data shape and path, so that its t means the model's t."""
    file = find_ema(ckpt)
    state, cls_cfg, _, cls_shape = load_ema(file)
    if cls_cfg.net.get("_target_") not in CLASSIFIERS:
        raise DiffcliError(f"classifier={file} is a denoising model, not a classifier; train one with net="
                           "unet_classifier (images) or net=mlp_classifier (2D) on the model's path and data")
    _check_companion("classifier", file, cls_cfg, cls_shape, train_cfg, shape,
                     "train the classifier with the model's model= and data= settings")
    k = model_classes(train_cfg.model)
    if k and k != cls_cfg.model.n_classes:
        raise DiffcliError(f"classifier={file} knows {cls_cfg.model.n_classes} classes, the model {k}: train both on "
                           "the same labelled data")
    net, path = _net_and_path(file, state, cls_cfg, cls_shape, int(cls_cfg.model.n_classes))
    return NoisyClassifier(net.to(device).eval(), path, cls_cfg.model.precond, cls_cfg.model.sigma_data)


def even_labels(n: int, n_classes: int) -> torch.Tensor | None:
    """0, 1, ..., K-1, 0, 1, ...: n labels spread evenly over the classes (None for an unconditional model)."""
    return torch.arange(n) % n_classes if n_classes else None


def model_classes(model_cfg: DictConfig) -> int:
    """The classes a model was trained on (0: unconditional)."""
    return int(model_cfg.get("n_classes") or 0) if model_cfg.get("cond", "none") == "class" else 0


def requested_labels(cfg: DictConfig, denoiser: Denoiser, conditional: bool) -> torch.Tensor | None:
    """The class of each of the cfg.n samples: `label=`, `labels=` (cycled), or for a model trained with labels (or
    guided by a classifier) an even spread; None when none was asked of a model trained without (net=oracle knows
    its mixture's classes but samples the mixture itself unless asked for one)."""
    guided = denoiser.classifier is not None
    k = denoiser.n_classes or (denoiser.classifier.n_classes if guided else 0)
    conditional = conditional or guided
    label, labels = cfg.get("label"), cfg.get("labels")
    if label is not None and labels is not None:
        raise DiffcliError("give label=<class> or labels=[...], not both")
    asked = [label] if label is not None else (list(labels) if labels is not None else None)
    if not k:
        if asked is not None or (cfg.get("guidance", 1.0) != 1.0 and not cfg.get("guide")):
            what = "label=/labels=" if asked is not None else f"guidance={cfg.get('guidance')}"
            raise DiffcliError(f"{what} needs a class-conditional model; this one was trained without labels "
                               "(train one with model.cond=class, or guide it with classifier=<ckpt>)")
        return None
    if asked is None:
        return even_labels(cfg.n, k if conditional else 0)
    if max(asked) >= k:
        raise DiffcliError(f"class {max(asked)} does not exist: this model knows classes 0 to {k - 1}")
    return torch.tensor(asked).repeat(math.ceil(cfg.n / len(asked)))[: cfg.n]


def load_guide(ckpt: str, device, net_class, train_cfg: DictConfig, shape) -> Denoiser:
    """Autoguidance's weaker model: a checkpoint of the same data shape and path (an earlier or smaller run)."""
    guide, guide_cfg, _, guide_shape, file = load_model(ckpt, device, net_class)
    _check_companion("guide", file, guide_cfg, guide_shape, train_cfg, shape, "autoguidance needs the model's own "
                     "data shape and path: pick an earlier checkpoint or a smaller model of the same formulation")
    return guide


def model_denoiser(net, path, model_cfg: DictConfig) -> Denoiser:
    """The Denoiser a model config describes: its prediction, input preconditioning and sigma_data."""
    return Denoiser(net, path, model_cfg.prediction, model_cfg.precond, model_cfg.sigma_data)


def sampler_config(cfg: DictConfig, model_cfg: DictConfig) -> DictConfig:
    """The `sampler` node of cfg, or (when none was chosen) the formulation's default `model.sampler`.

    The default's YAML is read from the shipped configs and resolved against cfg's `steps` and
    `eta`, exactly as if `sampler=<model.sampler>` had been given on the command line; a bare
    `sampler: {steps: ...}` node (sample.yaml, eval.yaml) is merged over it, so
    `diffcli eval -m sampler.steps=5,10,20` sweeps the default sampler's steps.
    """
    from importlib.resources import files

    from omegaconf import OmegaConf

    from .build import SAMPLER_NAMES

    chosen = cfg.get("sampler")
    if chosen is not None and not OmegaConf.is_missing(chosen, "fn"):
        if "_target_" not in chosen.fn:
            raise DiffcliError("sampler.fn.* options were given without a sampler: choose the sampler too, "
                               "e.g. sampler=langevin sampler.fn.n_steps=50")
        return chosen

    if model_cfg.sampler not in SAMPLER_NAMES:  # the name picks a shipped file: never a path of its own
        raise DiffcliError(f"model.sampler={model_cfg.sampler} is not a diffcli sampler; choose one of "
                           f"{', '.join(SAMPLER_NAMES)}")
    node = OmegaConf.load(files("diffcli.configs").joinpath("sampler", f"{model_cfg.sampler}.yaml"))
    if chosen is not None:  # sampler.steps=... given without sampler=...: it applies to the default sampler
        given = OmegaConf.to_container(chosen, resolve=True, throw_on_missing=False)
        node = OmegaConf.merge(node, {k: v for k, v in given.items() if v not in (None, "???")})
    return OmegaConf.create({"steps": cfg.get("steps"), "eta": cfg.get("eta", 0.0), "sampler": node}).sampler


def sampler_from_config(sampler_cfg: DictConfig, path, is_image: bool = False):
    """(sampler function, time grid) from a `sampler/` config group entry.

    Both come from diffcli's own tables (diffcli/build.py). `clip_x0: auto` clamps the predicted x0
    to [-1, 1] for images, where every pixel lives (as Ho et al.'s sampler and diffusers' clip_sample
    do: it keeps an under-trained model's samples from saturating), and never for 2D points.
    """
    fn = build_sampler_fn(sampler_cfg.fn, is_image)
    check_sampler(fn.func.__name__, path, **fn.keywords)  # refuse an invalid pair before any work
    steps = sampler_cfg.steps if sampler_cfg.steps is not None else sampler_cfg.default_steps
    if steps is None and sampler_cfg.grid.get("name") != "levels":  # a DDPM model's own steps, all of them
        steps = path.T or sampler_cfg.get("continuous_steps")
    return fn, build_grid(sampler_cfg.grid, path, None if steps is None else int(steps))


def sampler_description(sampler, sampler_cfg: DictConfig, grid: torch.Tensor) -> str:
    """What runs, for logs and titles: the sampler and its time grid, e.g. 'langevin on the levels grid of 10 times'
    (the NFE, which the grid alone does not fix, is logged once sampling has counted it)."""
    return (f"{sampler.func.__name__} on the {sampler_cfg.grid.get('name', '?')} grid of {len(grid)} times "
            f"(t = {grid[0].item():.3g} to {grid[-1].item():.3g})")


@torch.no_grad()
def generate(denoiser: Denoiser, sampler, grid, n: int, shape, *, batch_size: int, seed: int,
             device: torch.device, trajectory: list | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """n samples in batches, reproducible from `seed`, returned on the CPU; sample i of class labels[i] when
    labels are given (the Denoiser applies them, and any guidance set on it).

    With a `trajectory` list, it receives one tensor (frames, n, *shape): the states the sampler visited.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    out, frames = [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x1 = denoiser.path.sample_prior((b, *shape), g, device)
        denoiser.labels = None if labels is None else labels[start : start + b].to(device)
        visited = [] if trajectory is not None else None
        extra = {} if visited is None else {"trajectory": visited}
        out.append(sampler(denoiser, denoiser.path, x1 * denoiser.path.sigma(grid[0]), grid, generator=g,
                           **extra).cpu())
        if visited is not None:
            frames.append(torch.stack(visited))
    denoiser.labels = None
    if trajectory is not None:
        trajectory.append(torch.cat(frames, dim=1))
    return torch.cat(out)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_trajectory_picture(frames: torch.Tensor, file: FsPath) -> FsPath:
    """2D: sample paths from the prior (grey) to the samples (blue); images: rows of samples over time."""
    if frames.ndim == 5:  # (frames, n, C, H, W): 8 samples, 10 moments in time
        from torchvision.utils import save_image

        cols = torch.linspace(0, len(frames) - 1, min(10, len(frames))).round().long()
        strip = frames[cols][:, :8].transpose(0, 1).flatten(0, 1)  # row = one sample's path
        save_image((strip.clamp(-1, 1) + 1) / 2, file, nrow=len(cols))
        return FsPath(file)
    plt = pyplot()
    paths = frames[:, :300]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(paths[..., 0], paths[..., 1], lw=0.4, alpha=0.35, c="tab:blue")
    ax.scatter(*paths[0].T, s=3, c="0.6", label="prior (t = 1)")
    ax.scatter(*paths[-1].T, s=3, c="tab:red", label="samples (t = 0)")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=3)
    ax.set_title("sampling trajectories")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return FsPath(file)


@torch.no_grad()
def save_field_picture(denoiser: Denoiser, reference: torch.Tensor, file: FsPath,
                       times=(0.8, 0.4, 0.1, 0.02)) -> FsPath:
    """The learned score (Gaussian prior) or velocity (otherwise) as arrows at a few times, over the data."""
    path, plt = denoiser.path, pyplot()
    lo, hi = reference.min(0).values - 1, reference.max(0).values + 1
    axes_1d = [torch.linspace(lo[i].item(), hi[i].item(), 21) for i in range(2)]
    grid = torch.stack(torch.meshgrid(*axes_1d, indexing="xy"), -1).reshape(-1, 2)
    device = denoiser.device
    kind = "score" if path.prior == "gaussian" else "velocity"
    fig, axes = plt.subplots(1, len(times), figsize=(4 * len(times), 4))
    for ax, t_val in zip(axes, times):
        t = torch.tensor(t_val, dtype=torch.float64)
        x0, x1 = (v.cpu() for v in denoiser.predict(grid.to(device), t))
        field = -x1 / path.sigma(t) if kind == "score" else path.d_alpha(t) * x0 + path.d_sigma(t) * x1
        ax.scatter(*reference.T, s=1, c="0.8")
        ax.quiver(grid[:, 0], grid[:, 1], field[:, 0], field[:, 1], color="tab:blue")
        ax.set(title=f"learned {kind}, t = {t_val}", aspect="equal")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return FsPath(file)


def class_rows(samples: torch.Tensor, labels: torch.Tensor, cols: int = 10, max_rows: int = 20) -> torch.Tensor:
    """Images arranged one row per requested class (the first `cols` of each; short rows padded in black)."""
    rows = []
    for c in sorted(set(labels.tolist()))[:max_rows]:
        row = samples[labels == c][:cols]
        rows.append(torch.cat([row, -torch.ones(cols - len(row), *samples.shape[1:])]))
    return torch.cat(rows)


def save_picture(samples: torch.Tensor, file: FsPath, reference: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, title: str | None = None) -> FsPath:
    """An image grid for images in [-1, 1] (one row per class when labels are given); a scatter plot (over
    reference data, coloured by requested class) for 2D points."""
    file = FsPath(file)
    if samples.ndim == 4:
        from torchvision.utils import save_image

        if labels is not None:
            save_image((class_rows(samples, labels.cpu()) + 1) / 2, file, nrow=10)
        else:
            save_image((samples[:256] + 1) / 2, file, nrow=int(math.ceil(math.sqrt(min(len(samples), 256)))))
        return file
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    if reference is not None:
        ax.scatter(*reference.T.cpu(), s=2, c="0.75", label="data")
    if labels is None:
        ax.scatter(*samples.T, s=2, c="tab:blue", label="samples")
    else:
        points = ax.scatter(*samples.T, s=2, c=labels.cpu() % 10, cmap="tab10", vmin=0, vmax=9)
        ax.legend(*points.legend_elements(), title="class", loc="upper right", fontsize="small")
    ax.set_aspect("equal")
    if labels is None:
        ax.legend(loc="upper right", markerscale=4)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return file


def sample_checkpoint(cfg: DictConfig, trajectory: list | None = None, loaded: tuple | None = None) -> dict:
    """Samples of `cfg.n` from `cfg.ckpt` (or an already `loaded` load_model result) with `cfg.sampler`."""
    check_ranges(cfg)
    device = pick_device(cfg.device)
    denoiser, train_cfg, step, shape, file = loaded or load_model(cfg.ckpt, device, cfg.get("net_class"))
    if cfg.get("n") is None:
        cfg = OmegaConf.merge(cfg, {"n": DEFAULT_N["images" if len(shape) == 3 else "points"]})
    sampler_cfg = sampler_config(cfg, train_cfg.model)
    sampler, grid = sampler_from_config(sampler_cfg, denoiser.path, len(shape) == 3)
    how = sampler_description(sampler, sampler_cfg, grid)
    if cfg.get("classifier"):
        denoiser.classifier = load_classifier(cfg.classifier, device, train_cfg, shape)
        denoiser.classifier_scale = float(cfg.get("classifier_scale", 1.0))
    elif cfg.get("classifier_scale", 1.0) != 1.0:
        raise DiffcliError(f"classifier_scale={cfg.classifier_scale} needs classifier=<ckpt of a noise-conditional "
                           "classifier> (diffcli train net=unet_classifier ...)")
    labels = requested_labels(cfg, denoiser, model_classes(train_cfg.model) > 0)
    denoiser.guidance = float(cfg.get("guidance", 1.0))
    interval = cfg.get("guidance_interval")
    denoiser.guidance_interval = None if interval is None else (float(interval[0]), float(interval[1]))
    if cfg.get("guide"):
        denoiser.guide = load_guide(cfg.guide, device, cfg.get("net_class"), train_cfg, shape)
    log.info("sampling %d from %s (step %d) with %s%s", cfg.n, file, step, how,
             "" if labels is None else f", classes {sorted(set(labels.tolist()))[:10]}, guidance w = {denoiser.guidance}"
             + (f", classifier scale {denoiser.classifier_scale}" if denoiser.classifier is not None else ""))
    samples = generate(denoiser, sampler, grid, cfg.n, shape, batch_size=cfg.batch_size, seed=cfg.seed,
                       device=device, trajectory=trajectory, labels=labels)
    bad = (~torch.isfinite(samples.flatten(1))).any(1).sum().item()
    if bad:
        raise DiffcliError(f"{bad} of {cfg.n} samples from {file} (step {step}) are not finite (NaN or inf): the "
                           "weights diverged or the sampler is unstable; try an earlier checkpoint or another sampler")
    nfe = denoiser.nfe // math.ceil(cfg.n / cfg.batch_size)  # evaluations per sample
    log.info("sampled %d with %s: %d network evaluations (NFE) per sample", cfg.n, how, nfe)
    return {"samples": samples, "labels": labels, "nfe": nfe, "n": cfg.n, "ckpt": str(file), "step": step, "how": how,
            "steps": len(grid) - 1, "sampler": sampler.func.__name__, "guidance": denoiser.guidance,
            "classifier_scale": denoiser.classifier_scale if denoiser.classifier is not None else None,
            "train_cfg": train_cfg, "shape": shape, "denoiser": denoiser, "grid": grid}


def reference_data(train_cfg: DictConfig, n: int, seed: int) -> torch.Tensor | None:
    """Fresh samples of a 2D toy the model was trained on (None for images)."""
    from .data import build_data

    data = build_data(train_cfg.data, torch.device("cpu"), seed=seed)
    return None if data.is_image else data.sample(n, torch.Generator().manual_seed(seed + 1))


def run_sample(cfg: DictConfig, out_dir) -> dict:
    """Sample `cfg.n` points from `cfg.ckpt`; writes samples.npz and pictures into out_dir."""
    options = cfg.get("sample") or {}
    trajectory = [] if options.get("save_trajectory") else None
    out = sample_checkpoint(cfg, trajectory)
    out_dir = FsPath(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": out["samples"].numpy(), "nfe": out["nfe"], "t_grid": out["grid"].numpy()}
    if out["labels"] is not None:  # the requested class of every sample
        arrays["labels"] = out["labels"].numpy()
    if trajectory is not None:
        frames = trajectory[0] if len(out["shape"]) == 1 else _thin(trajectory[0])
        arrays["trajectory"] = frames.numpy()
        out["trajectory_picture"] = str(save_trajectory_picture(frames, out_dir / "trajectories.png"))
    np.savez(out_dir / "samples.npz", **arrays)
    reference = reference_data(out["train_cfg"], out["n"], cfg.seed) if len(out["shape"]) == 1 else None
    out["picture"] = str(save_picture(out["samples"], out_dir / "samples.png", reference, out["labels"]))
    if options.get("plot_field"):
        if reference is None:
            raise DiffcliError("sample.plot_field=true draws 2D fields; this model was trained on images")
        out["field_picture"] = str(save_field_picture(out["denoiser"], reference, out_dir / "field.png"))
    log.info("wrote %s and pictures in %s (%s, NFE %d per sample)", out_dir / "samples.npz", out_dir, out["how"],
             out["nfe"])
    return out


def _thin(frames: torch.Tensor, max_frames: int = 21, max_samples: int = 16) -> torch.Tensor:
    """Image trajectories are large: keep a few samples at a few moments."""
    keep = torch.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().long()
    return frames[keep][:, :max_samples]
