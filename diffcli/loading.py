"""Loading: a checkpoint, its companions (autoguidance's guide, classifier guidance's classifier) and the device,
rebuilt with diffcli's own classes into values (LoadedModel) that every command shares.

The stored config only fills in arguments: a network class of the user's own must be named on the command line
(`net_class=`), never taken from the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import DiffcliError, diffusers_format, short
from .build import CLASSIFIERS, build_net, build_path, path_arguments
from .checkpoint import find_ema, load_ema, load_weights
from .data import shape_kind
from .guidance import NoisyClassifier
from .prediction import Denoiser

log = logging.getLogger("diffcli")


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


@dataclass(frozen=True)
class LoadedModel:
    """A trained model as the commands use it: its bare Denoiser (no conditions), the config it was trained with,
    its step, its data shape and the file it came from."""

    denoiser: Denoiser
    config: DictConfig
    step: int
    shape: tuple
    file: Path

    @property
    def kind(self) -> str:
        """"images" or "points" (data.shape_kind)."""
        return shape_kind(self.shape)

    @property
    def n_classes(self) -> int:
        """The classes the model was trained on (0: unconditional)."""
        return model_classes(self.config.model)


def model_classes(model_cfg: DictConfig) -> int:
    """The classes a model config was trained on (0: unconditional)."""
    return int(model_cfg.get("n_classes") or 0) if model_cfg.get("cond", "none") == "class" else 0


def model_denoiser(net, path, model_cfg: DictConfig) -> Denoiser:
    """The Denoiser a model config describes: its prediction, input preconditioning and sigma_data."""
    return Denoiser(net, path, model_cfg.prediction, model_cfg.precond, model_cfg.sigma_data,
                    sigma_min=model_cfg.get("sigma_min") or 0.0)


def load_model(ckpt: str | None, device: torch.device, net_class: str | None = None) -> LoadedModel:
    """The model of an EMA checkpoint (a file or a run folder; None: the newest run under ./outputs/) or of a
    diffusers folder (diffusers_format)."""
    if diffusers_format.is_folder(ckpt):
        file, (state, train_cfg, step, shape) = Path(ckpt), diffusers_format.read_folder(ckpt)
    else:
        file = find_ema(ckpt)
        state, train_cfg, step, shape = load_ema(file)
    if ckpt is None:
        log.info("no ckpt given: using the newest training run, %s", file)
    if train_cfg.net.get("_target_") in CLASSIFIERS:
        raise DiffcliError(f"ckpt={file} is a noise-conditional classifier, which guides a model but cannot sample: "
                           f"give a model's checkpoint as ckpt= and this one as classifier={file}")
    net, path = _net_and_path(file, state, train_cfg, shape, model_classes(train_cfg.model), net_class)
    return LoadedModel(model_denoiser(net.to(device).eval(), path, train_cfg.model), train_cfg, step, tuple(shape),
                       Path(file))


def _net_and_path(file, state: dict, cfg: DictConfig, shape, n_classes: int, net_class: str | None = None):
    """The network (its weights loaded) and the path that a checkpoint's stored config describes; errors name the
    file."""
    try:
        net = build_net(cfg.net, shape, user_class=net_class, n_classes=n_classes, fits=state)
        load_weights(net, state, "its weights")
        return net, build_path(cfg.model.path)
    except DiffcliError as e:
        raise DiffcliError(f"{file}: {e}") from None


def _check_companion(role: str, file, cfg: DictConfig, shape, model: LoadedModel, fix: str) -> None:
    """A guide or a classifier must share the model's data (not only its shape: MNIST and Fashion-MNIST share one)
    and path, so that its t means the model's t and its classes the model's."""
    if (tuple(shape) != tuple(model.shape) or _data_of(cfg) != _data_of(model.config)
            or path_arguments(cfg.model.path) != path_arguments(model.config.model.path)):
        name = lambda c: c.model.path._target_.rsplit(".", 1)[-1]  # noqa: E731
        raise DiffcliError(f"{role}={file} was trained on {_data_text(cfg)} {tuple(shape)} with path {name(cfg)}, "
                           f"the model on {_data_text(model.config)} {tuple(model.shape)} with {name(model.config)}: "
                           f"{fix}")


def _data_of(cfg: DictConfig) -> tuple:
    """What names a training set in a stored config: its name and, for a file or folder, that file's name (the
    folder it was read from may differ between two runs on the same data)."""
    path = cfg.data.get("path")
    return cfg.data.name, None if path is None else Path(str(path)).name


def _data_text(cfg: DictConfig) -> str:
    name, file = _data_of(cfg)
    return name if file is None else f"{name} ({short(file, 60)})"


def load_classifier(ckpt: str, device: torch.device, model: LoadedModel) -> NoisyClassifier:
    """Classifier guidance's p_t(y | x_t): a classifier checkpoint (diffcli train net=unet_classifier or
    mlp_classifier) trained on the model's data shape and path, so that its t means the model's t."""
    file = find_ema(ckpt)
    state, cls_cfg, _, cls_shape = load_ema(file)
    if cls_cfg.net.get("_target_") not in CLASSIFIERS:
        raise DiffcliError(f"classifier={file} is a denoising model, not a classifier; train one with net="
                           "unet_classifier (images) or net=mlp_classifier (2D) on the model's path and data")
    _check_companion("classifier", file, cls_cfg, cls_shape, model, "train the classifier with the model's model= "
                     "and data= settings")
    k, k_cls = model.n_classes, cls_cfg.model.get("n_classes")
    if not isinstance(k_cls, int) or k_cls < 2:
        raise DiffcliError(f"classifier={file} records no class count (model.n_classes={k_cls}); the file is damaged "
                           "or was edited: train the classifier again")
    if k and k != k_cls:
        raise DiffcliError(f"classifier={file} knows {k_cls} classes, the model {k}: train both on the same labelled "
                           "data")
    net, path = _net_and_path(file, state, cls_cfg, cls_shape, k_cls)
    return NoisyClassifier(net.to(device).eval(), path, cls_cfg.model.precond, cls_cfg.model.sigma_data)


def load_guide(ckpt: str, device, net_class, model: LoadedModel) -> Denoiser:
    """Autoguidance's weaker model: a checkpoint of the same data shape and path (an earlier or smaller run)."""
    guide = load_model(ckpt, device, net_class)
    _check_companion("guide", guide.file, guide.config, guide.shape, model, "autoguidance needs the model's own "
                     "data and path: pick an earlier checkpoint or a smaller model of the same formulation")
    if guide.n_classes and guide.n_classes != model.n_classes:  # an unconditional guide ignores the labels
        raise DiffcliError(f"guide={guide.file} knows {guide.n_classes} classes, the model {model.n_classes}: "
                           "autoguidance needs a guide trained on the model's labels, or one trained without labels")
    return guide.denoiser
