"""Networks, paths and samplers from config nodes, without letting a file choose code.

A `_target_` is looked up in diffcli's own tables (NETS, PATHS, SAMPLER_FNS); the one open leaf,
a user's own network class, is accepted only when the caller passes it as `user_class`, which
comes from the command line of this very command. Arguments must be plain values (numbers,
text, lists, mappings without `_target_`), are bound to the class's signature (unknown names
refused) and checked against its annotations (a float is never truncated to an int). Hydra's
`instantiate` is never used: it would call whatever a node names.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import types
import typing
from collections.abc import Sequence
from importlib.resources import files

from . import DiffcliError, short

PLAIN = (type(None), bool, int, float, str)


# What a config may name, as text: checking a name needs no import (cli.preflight runs before torch's).
# the noise-conditional classifiers p_t(y | x_t): trained by cross-entropy, used through classifier=<ckpt>
CLASSIFIERS = ("diffcli.nets.MLPClassifier", "diffcli.nets.UNetClassifier")
NETS = ("diffcli.nets.MLP", "diffcli.nets.UNet", "diffcli.oracle.Oracle", "diffcli.diffusers_net.DiffusersUNet2D",
        *CLASSIFIERS)
PATHS = tuple(f"diffcli.paths.{c}" for c in ("DDPMPath", "NCSNPath", "VEPath", "VPPath", "SubVPPath", "FlowPath"))
SAMPLER_NAMES = tuple(sorted(f.name[:-5] for f in files("diffcli.configs").joinpath("sampler").iterdir()
                             if f.name.endswith(".yaml")))  # the shipped sampler configs
SAMPLER_FNS = tuple(f"diffcli.samplers.{name}" for name in SAMPLER_NAMES)
SAMPLER_RUNTIME = ("denoiser", "path", "x", "t_grid", "generator", "trajectory")  # what generate() passes


def _diffcli_object(target: str):
    """One of the names above as the object it names (the module and attribute are diffcli's own)."""
    module, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def plain(value, where: str, targets: bool = False):
    """A config value as plain Python data; an interpolation inside it, or (unless `targets`) a `_target_`, is refused."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        if "_target_" in value and not targets:
            raise DiffcliError(f"{where} names a class (_target_: {value['_target_']}); only diffcli's own "
                               "networks, paths and samplers are built from configs, with plain arguments")
        return {k: plain(v, f"{where}.{k}", targets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]", targets) for i, v in enumerate(value)]
    if not isinstance(value, PLAIN):
        raise DiffcliError(f"{where} is a {type(value).__name__}; configs hold numbers, text, lists and mappings")
    if isinstance(value, float) and math.isnan(value):
        raise DiffcliError(f"{where} is NaN; give a number")
    if isinstance(value, str) and "${" in value:
        raise DiffcliError(f"{where}={value!r} is an interpolation; stored configs are data and are not resolved")
    return value


def _fits(value, hint) -> bool:
    """Whether a plain value fits a simple annotation (unknown annotations accept anything)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is inspect.Parameter.empty or hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    return True


WORDS = {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "null"}


def _describe(hint) -> str:
    """An annotation in words: 'an integer', 'a list of integers', 'a number or null'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if args and origin in (list, tuple, Sequence):
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"
    if args:
        return " or ".join(_describe(a) for a in args)
    return WORDS.get(hint) or getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_arguments(target, kwargs: dict, where: str, given_at_run_time=()) -> None:
    """Each config argument is a parameter of `target` (not one it gets at run time) and fits its annotation."""
    params = inspect.signature(target).parameters
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # a user's class with annotations that do not evaluate: names only
        hints = {}
    valid = [k for k, p in params.items() if k not in given_at_run_time and p.kind is not p.VAR_POSITIONAL]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in kwargs.items():
        if key not in valid and not takes_any:
            raise DiffcliError(f"{where}.{key} is not an argument of {target.__name__}; its arguments: {', '.join(valid)}")
        hint = hints.get(key, inspect.Parameter.empty)
        if not _fits(value, hint):
            raise DiffcliError(f"{where}.{key}={value!r} must be {_describe(hint)}")


def call(target, kwargs: dict, where: str, **runtime):
    """target(**runtime, **kwargs) after checking the arguments' names and types."""
    _check_arguments(target, kwargs, where, runtime)
    try:
        inspect.signature(target).bind(**runtime, **kwargs)
    except TypeError as e:  # a required argument missing
        raise DiffcliError(f"{where}: {e}") from None
    return target(**runtime, **kwargs)


def _split(node, where: str) -> tuple[str, dict]:
    """(_target_, plain arguments) of a node; other Hydra `_keys_` are refused."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    target = node.pop("_target_", None)
    if not isinstance(target, str):
        raise DiffcliError(f"{where}._target_ is missing; choose one of the shipped configs")
    node.pop("_partial_", None)
    extra = [k for k in node if k.startswith("_") and k.endswith("_")]
    if extra:
        raise DiffcliError(f"{where}.{extra[0]} is not supported; configs name a class and plain arguments only")
    return target, node


def _path_node(node, where: str) -> tuple[str, dict]:
    """(_target_, plain arguments) of a path node, its class one of diffcli's."""
    target, kwargs = _split(node, where)
    if target not in PATHS:
        raise DiffcliError(f"{where}._target_={target} is not a diffcli path; choose one of {', '.join(PATHS)}")
    return target, plain(kwargs, where)


def _net_node(node, user_class: str | None, where: str) -> tuple[str, dict, tuple | None]:
    """(_target_, plain arguments, the oracle's path node or None) of a net node."""
    target, kwargs = _split(node, where)
    if target not in NETS and target != user_class:
        how = f"name it on the command line (net_class={target})" if user_class is None else \
            f"the command line names {user_class}"
        raise DiffcliError(f"{where}._target_={target} is not a diffcli network and {how}; diffcli's own: "
                           f"{', '.join(NETS)}")
    path = _path_node(kwargs.pop("path", None), f"{where}.path") if target == "diffcli.oracle.Oracle" else None
    return target, plain(kwargs, where), path


# a sampler option -> (test, what it must be): checked on text when the sampler is named (before torch, before any
# training step), not when the first sample is drawn
SAMPLER_OPTIONS = {
    "order": (lambda v: v in (1, 2, 3), "1, 2 or 3"),
    "s_churn": (lambda v: v >= 0, "a number >= 0 (0: no churn; EDM uses up to 80)"),
    "s_noise": (lambda v: v >= 0, "a number >= 0 (1: the noise the SDE asks for)"),
    "s_tmin": (lambda v: v >= 0, "a noise level sigma/alpha >= 0"),
    "s_tmax": (lambda v: v >= 0, "a noise level sigma/alpha >= 0 (.inf: no upper bound)"),
    "eta": (lambda v: v >= 0, "a number >= 0"),
    "snr": (lambda v: v > 0, "a positive number (score_sde's 0.16 for images)"),
    "n_corrector": (lambda v: 0 <= v <= 1000, "an integer in [0, 1000]"),
    "n_steps": (lambda v: 0 < v <= 100_000, "an integer in [1, 100000]"),
    "step_size": (lambda v: v > 0, "a positive number"),
    "rtol": (lambda v: v > 0, "a positive number"),
    "atol": (lambda v: v > 0, "a positive number"),
}


def _sampler_node(node, where: str) -> tuple[str, dict]:
    target, kwargs = _split(node, where)
    if target not in SAMPLER_FNS:
        raise DiffcliError(f"{where}._target_={target} is not a diffcli sampler; choose one of "
                           f"{', '.join(SAMPLER_NAMES)}")
    kwargs = plain(kwargs, where)
    for key, (ok, what) in SAMPLER_OPTIONS.items():
        value = kwargs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                (math.isfinite(value) or key == "s_tmax") and ok(value)):
            raise DiffcliError(f"{where}.{key}={value} must be {what}")
    return target, kwargs


def check_names(cfg, user_class: str | None = None) -> None:
    """The classes a config names (net, model.path, sampler.fn) are diffcli's own or `user_class`, with
    plain arguments: checked on text alone, before anything is imported or built."""
    _net_node(cfg.net, user_class, "net")
    _path_node(cfg.model.path, "model.path")
    sampler = cfg.get("sampler")
    if sampler is not None and "fn" in sampler and sampler.fn is not None and "_target_" in sampler.fn:
        _sampler_node(sampler.fn, "sampler.fn")


def path_arguments(node, where: str = "model.path") -> tuple[str, dict]:
    """(class, every argument with its default filled in) of a path node: two stored configs that build the same
    path compare equal whether or not they spell out a default (a key added later, e.g. zero_terminal_snr)."""
    target, kwargs = _path_node(node, where)
    bound = inspect.signature(_diffcli_object(target)).bind(**kwargs)
    bound.apply_defaults()
    return target, dict(bound.arguments)


def build_path(node, where: str = "model.path"):
    """The probability path of a model config: one of diffcli.paths' classes."""
    target, kwargs = _path_node(node, where)
    return call(_diffcli_object(target), kwargs, where)


def build_net(node, shape, user_class: str | None = None, where: str = "net", n_classes: int = 0, fits=None):
    """A network: a diffcli class, or the user's own class when it was named on this command line; with
    n_classes > 0 it also takes class labels (the oracle knows its mixture's classes itself). With `fits` (the
    tensors of a checkpoint) its parameter shapes are first compared with them on the meta device, so that sizes
    read from a file (widths, class counts) never allocate more than the file itself holds."""
    if fits is not None:
        import torch

        try:
            with torch.device("meta"):
                net = _build_net(node, shape, user_class, where, n_classes, fits)
        except DiffcliError:
            raise
        except Exception:  # a class of the user's own that cannot be built without data: checked when loaded
            net = None
        if net is not None:
            _same_shapes(net, fits)
    return _build_net(node, shape, user_class, where, n_classes, fits)


def _build_net(node, shape, user_class, where: str, n_classes: int, fits):
    target, kwargs, path = _net_node(node, user_class, where)
    cls = _diffcli_object(target) if target in NETS else _locate(target, where)
    if path is not None:  # the oracle is handed its data (plain) and its path (built); loaded from a checkpoint,
        # the points it holds come from the file's tensors, never from the data file its stored config names
        return call(cls, kwargs, where, shape=shape, path=call(_diffcli_object(path[0]), path[1], f"{where}.path"),
                    points=None if fits is None else fits.get("points"))
    return call(cls, {**kwargs, "n_classes": n_classes} if n_classes else kwargs, where, shape=shape)


def _same_shapes(net, tensors: dict) -> None:
    """The network's state_dict and a checkpoint's tensors have the same names and shapes (one line otherwise)."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        name = next((k for k in expected if expected[k] != found.get(k)), None) or next(k for k in found
                                                                                         if k not in expected)
        raise DiffcliError(f"its weights do not fit the network its config describes ({short(name)}: "
                           f"{found.get(name, 'absent')} in the file, {expected.get(name, 'absent')} in the "
                           f"network); the file is damaged or was edited")


def build_sampler_fn(node, is_image: bool, where: str = "sampler.fn"):
    """A sampler of diffcli.samplers with its options bound; `clip_x0: auto` clamps images only (static)."""
    target, kwargs = _sampler_node(node, where)
    if kwargs.get("clip_x0") == "auto":
        kwargs["clip_x0"] = "static" if is_image else "none"
    fn = _diffcli_object(target)
    _check_arguments(fn, kwargs, where, SAMPLER_RUNTIME)
    if "clip_x0" in inspect.signature(fn).parameters:  # a bad clipping setting fails now, not at the first sample
        from .samplers.core import CLIP_OPTIONS, x0_clipper

        x0_clipper(**{k: v for k, v in kwargs.items() if k in CLIP_OPTIONS})
    return functools.partial(fn, **kwargs)


def build_grid(node, path, steps, where: str = "sampler.grid"):
    """A time grid of diffcli.samplers.GRIDS with its arguments checked."""
    from .samplers import GRIDS

    args = plain(node, where)
    name = args.pop("name", None) if isinstance(args, dict) else None
    if name not in GRIDS:
        raise DiffcliError(f"{where}.name={name} is not a time grid; choose one of {', '.join(GRIDS)}")
    return call(GRIDS[name], args, where, path=path, steps=steps)


def _locate(name: str, where: str):
    """The user's own class by its dotted name (typed on this command line)."""
    from hydra.utils import get_class

    try:
        return get_class(name)
    except Exception as e:
        raise DiffcliError(f"{where}._target_={name} cannot be imported ({str(e).splitlines()[0]})") from None
