"""Checkpoints as safetensors: no pickle anywhere, every file written atomically.

- `ema_<step>.safetensors`: EMA weights; metadata = format, version, step, data shape and the
  resolved training config (JSON). `sample` and `eval` rebuild everything from this file alone.
- `state_<step>.safetensors`: raw weights, EMA, optimizer state, RNG states; the small
  non-tensor parts (param groups, grad-scaler state, step) as JSON in the metadata.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open

from . import DiffcliError, short

# torch is imported inside the functions that move tensors: a checkpoint's metadata and config are
# checked (cli.preflight) before torch's import, so a refused file costs a second, not four.

FORMAT, VERSION = "diffcli", "1"
# Bounds on what a file may ask for, checked before anything is parsed deeply or built: a diffcli config is a few
# kB and a few levels deep; the largest shape is one sample's (a 2048 x 2048 RGB image is 12.6 M numbers).
MAX_ENTRY = 1 << 20      # characters of one metadata entry (config, optimizer, ...)
MAX_DEPTH = 32           # nesting of a JSON entry
MAX_SAMPLE_NUMEL = 1 << 24
TMP = ".tmp"  # the temporary files of save_atomic before runs.atomic_file: .<name>.tmp<pid>
STEP_FILE = re.compile(r"^(ema|state)_(\d+)\.safetensors$")


def strip_prefixes(state: dict) -> dict:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes from parameter names."""
    return {re.sub(r"(?<![^.])(?:module|_orig_mod)\.", "", k): v for k, v in state.items()}


def save_atomic(tensors: dict, metadata: dict[str, str], path: Path) -> None:
    """Write through runs.atomic_file (a temporary in the same folder, then a rename): a crash never leaves half a
    file."""
    from safetensors.torch import save_file

    from .runs import atomic_file

    path = Path(path)
    # copies: tied or shared tensors (or the same module saved twice) must not alias on disk
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    try:
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except (OSError, SafetensorError) as e:  # disk full, read-only or vanished folder, file-size limit
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(": ")[-1][:120]
        raise DiffcliError(f"cannot write {path.name} in {path.parent} ({reason}); free space or give a writable "
                           "folder (hydra.run.dir=...); the files already there are intact") from None


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the half-written temporary files a killed save_atomic left in `folder` (runs.atomic_file's, and the
    `.<name>.tmp<pid>` of versions before it)."""
    found = [p for pattern in (f".*{TMP}*", ".*.partial*") for p in Path(folder).glob(pattern) if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def read_metadata(path: Path) -> dict:
    """The metadata of a diffcli checkpoint (no tensors read), or a one-line error saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DiffcliError(f"checkpoint {path} does not exist; give ckpt=<run dir or .safetensors file>")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:  # the safetensors parser's errors say 'header', 'incomplete', ...
        raise DiffcliError(f"{path} is not a readable checkpoint (truncated or not safetensors: {e})") from None
    if meta.get("format") != FORMAT:
        raise DiffcliError(f"{path} is a safetensors file but not a diffcli checkpoint (no diffcli metadata)")
    big = next((k for k, v in meta.items() if len(v) > MAX_ENTRY), None)
    if big is not None:
        raise DiffcliError(f"{path}: its metadata '{short(big, 40)}' holds {len(meta[big]) / 1e6:.1f} M characters, more than "
                           f"a diffcli checkpoint writes ({MAX_ENTRY // 1024} k at most); the file is damaged or hostile")
    return meta


def read_tensors(path: Path):
    """Tensors and metadata of a diffcli checkpoint."""
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:
        raise DiffcliError(f"{path} is not a readable checkpoint (truncated or not safetensors: {e})") from None


def save_ema(path: Path, net_state: dict, cfg: DictConfig, step: int, shape) -> None:
    meta = {"format": FORMAT, "format_version": VERSION, "kind": "ema", "step": str(step),
            "shape": json.dumps(list(shape)), "config": json.dumps(OmegaConf.to_container(cfg, resolve=True))}
    save_atomic(strip_prefixes(net_state), meta, path)


def _field(meta: dict, key: str, path: Path, parse=json.loads):
    """One metadata entry, parsed; a missing, unreadable or too deeply nested one is a one-line error."""
    try:
        value = parse(meta[key])
    except (KeyError, TypeError, ValueError, RecursionError):
        value = ...
    if value is ... or depth(value) > MAX_DEPTH:
        raise DiffcliError(f"{path}: its metadata has no valid '{key}' entry; the file is damaged or was not "
                           "written by diffcli (train again or take another checkpoint)") from None
    return value


def depth(value) -> int:
    """How deeply lists and mappings nest in parsed JSON (0 for a number or text), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:  # deeper is refused anyway: no need to walk it all
                todo.extend((v, level + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _step_and_shape(meta: dict, path: Path) -> tuple[int, tuple]:
    step, shape = _field(meta, "step", path, int), _field(meta, "shape", path)
    if (step < 0 or not isinstance(shape, list) or not 0 < len(shape) <= 4
            or not all(type(s) is int and s > 0 for s in shape) or math.prod(shape) > MAX_SAMPLE_NUMEL):
        raise DiffcliError(f"{path}: its metadata has an invalid step ({short(step, 20)}) or data shape "
                           f"({short(shape, 60)}); the file is damaged or was not written by diffcli")
    return step, tuple(shape)


CLASS_KEYS = ("net", "net.path", "model.path", "sampler.fn")  # the nodes diffcli builds (from its own tables)


def _targets_only_at(node, allowed, where: str = "") -> None:
    """Refuse a `_target_` anywhere but at the nodes diffcli builds: elsewhere a config is plain data."""
    if isinstance(node, dict):
        if "_target_" in node and where not in allowed:
            raise DiffcliError(f"config.{where} names a class (_target_: {node['_target_']}); only "
                               f"{', '.join(allowed)} may, and only diffcli's own")
        for key, value in node.items():
            _targets_only_at(value, allowed, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _targets_only_at(value, allowed, f"{where}[{i}]")


def _check_classes(model, path: Path) -> None:
    """A stored class count and class-name list are bounded, and agree, before the schema reads them (a list of a
    million names takes minutes to validate)."""
    from .ranges import MAX_CLASSES

    model = model if isinstance(model, dict) else {}
    k, names = model.get("n_classes"), model.get("class_names")
    if k is not None and (type(k) is not int or not 0 <= k <= MAX_CLASSES):
        raise DiffcliError(f"{path}: the stored model.n_classes={short(k, 20)} must be an integer in [0, {MAX_CLASSES}]; "
                           "the file is damaged or was edited")
    if names is not None and (not isinstance(names, list) or len(names) != (k or 0)):
        raise DiffcliError(f"{path}: the stored model.class_names has {len(names) if isinstance(names, list) else 'no'} "
                           f"entries for n_classes={k}; the file is damaged or was edited")


def stored_config(meta: dict, path: Path) -> DictConfig:
    """The training config a checkpoint carries, as data: typed by the schema, never resolved or run.

    Interpolations are refused (a stored config was resolved when it was written, so one that
    holds `${...}` was edited by someone); the sampler must be one diffcli ships, since its name
    picks a config file.
    """
    from .build import SAMPLER_NAMES, plain
    from .ranges import check_ranges
    from .schema import TrainApp, validate

    config = _field(meta, "config", path)
    if not isinstance(config, dict):
        raise DiffcliError(f"{path}: its metadata 'config' is not a mapping; the file is damaged")
    _check_classes(config.get("model"), path)
    try:
        plain(config, "config", targets=True)  # classes are checked where they are built (diffcli/build.py)
        _targets_only_at(config, CLASS_KEYS)
    except DiffcliError as e:
        raise DiffcliError(f"{path}: the stored {e}; refusing to load it") from None
    cfg = validate(config, TrainApp, f"{path}: the stored config")
    try:
        check_ranges(cfg)
    except DiffcliError as e:
        raise DiffcliError(f"{path}: the stored {e}; the file is damaged or was edited") from None
    if cfg.model.sampler not in SAMPLER_NAMES:
        raise DiffcliError(f"{path}: the stored model.sampler={cfg.model.sampler!r} is not a diffcli sampler "
                           f"({', '.join(SAMPLER_NAMES)}); refusing to load it")
    return cfg


def load_ema(path: Path):
    """(state_dict, config, step, shape) from an EMA checkpoint."""
    tensors, meta = read_tensors(path)
    if meta.get("kind") != "ema":
        raise DiffcliError(f"{path} is a training-state checkpoint; give an ema_<step>.safetensors file or the run dir")
    return tensors, stored_config(meta, path), *_step_and_shape(meta, path)


def load_weights(net, state: dict, what: str) -> None:
    """net.load_state_dict(state), with a one-line error when the tensors do not fit the network."""
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        detail = " ".join(str(e).split())[:200]
        raise DiffcliError(f"{what} do not fit the network its config describes ({detail}); the file is "
                           "damaged or was edited") from None


def _flatten_optimizer(opt_state: dict):
    """Optimizer state as flat tensors plus JSON for the param groups and any non-tensor entries."""
    import torch

    tensors, scalars = {}, {}
    for idx, entries in opt_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, info: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in info["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_state(path: Path, *, net, ema_net, optimizer, scaler, step: int, cfg: DictConfig, shape,
               target_net=None) -> None:
    """Everything needed to resume exactly (with consistency distillation's target network)."""
    import torch

    opt_tensors, opt_info = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"net.{k}": v for k, v in strip_prefixes(net.state_dict()).items()}
    tensors |= {f"ema.{k}": v for k, v in strip_prefixes(ema_net.state_dict()).items()}
    if target_net is not None:
        tensors |= {f"target.{k}": v for k, v in strip_prefixes(target_net.state_dict()).items()}
    tensors |= opt_tensors | {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    meta = {"format": FORMAT, "format_version": VERSION, "kind": "state", "step": str(step),
            "shape": json.dumps(list(shape)), "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
            "optimizer": json.dumps(opt_info), "scaler": json.dumps(scaler.state_dict() if scaler else {})}
    save_atomic(tensors, meta, path)


def load_state(path: Path) -> dict:
    """The pieces written by save_state, as plain dicts."""
    tensors, meta = read_tensors(path)
    if meta.get("kind") != "state":
        raise DiffcliError(f"{path} is not a training-state checkpoint (state_<step>.safetensors)")
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    config, (step, shape) = stored_config(meta, path), _step_and_shape(meta, path)
    optimizer, scaler = _field(meta, "optimizer", path), _field(meta, "scaler", path)
    try:
        rng_cuda = [v for k, v in sorted(part("rng.cuda.").items(), key=lambda kv: int(kv[0]))]
        return {"net": part("net."), "ema": part("ema."), "target": part("target."), "rng_cpu": tensors["rng.cpu"], "rng_cuda": rng_cuda,
                "optimizer": _unflatten_optimizer(part("optim."), optimizer), "scaler": scaler, "step": step,
                "config": config, "shape": shape}
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise DiffcliError(f"{path}: its training state is incomplete ({type(e).__name__}: {e}); the file is "
                           "damaged; resume from an older state_<step>.safetensors") from None


def newest_state(run) -> tuple[Path, Path]:
    """(run folder, its newest state_<step>.safetensors) for train.resume."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise DiffcliError(f"train.resume={run_dir} is not a folder; give the run folder of a diffcli train run")
    states = list_checkpoints(run_dir / "checkpoints", "state")
    if not states:
        raise DiffcliError(f"train.resume={run_dir}: no checkpoints/state_<step>.safetensors there to resume from")
    return run_dir, states[-1]


def list_checkpoints(folder: Path, kind: str) -> list[Path]:
    """`<kind>_<step>.safetensors` files in a folder, oldest step first."""
    found = [(int(m.group(2)), p) for p in Path(folder).glob(f"{kind}_*.safetensors")
             if (m := STEP_FILE.match(p.name)) and m.group(1) == kind]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints of each kind (0 keeps all)."""
    for kind in ("ema", "state"):
        for p in list_checkpoints(folder, kind)[:-keep_last] if keep_last > 0 else []:
            p.unlink(missing_ok=True)


def find_ema(ckpt: str | None, outputs: Path = Path("outputs")) -> Path:
    """An EMA checkpoint from a file, a run dir, or (ckpt=None) the newest training run under outputs/."""
    if ckpt is None:
        runs = [p for p in outputs.glob("**/checkpoints/ema_*.safetensors") if STEP_FILE.match(p.name)]
        if not runs:
            raise DiffcliError(f"no training run with checkpoints under {outputs.resolve()}/; "
                               "train one first (diffcli train ...) or give ckpt=<run dir or file>")
        return Path(ckpt_in_run(max(runs, key=lambda p: p.stat().st_mtime).parent.parent))
    path = Path(ckpt)
    if path.is_dir():
        return ckpt_in_run(path)
    if not path.exists():
        raise DiffcliError(f"ckpt={ckpt} does not exist; give a training run dir or an ema_<step>.safetensors file")
    return path


def ckpt_in_run(run_dir: Path) -> Path:
    """The newest EMA checkpoint of a training run."""
    found = list_checkpoints(Path(run_dir) / "checkpoints", "ema")
    if not found:
        raise DiffcliError(f"{run_dir} holds no checkpoints/ema_<step>.safetensors, nor a diffusers pipeline "
                           "(model_index.json, or unet/ and scheduler/); give a diffcli training run or such a folder")
    return found[-1]
