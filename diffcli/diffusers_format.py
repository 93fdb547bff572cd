"""diffusers' folder format (`model_index.json`, `unet/`, `scheduler/`) read as a diffcli model and written from one.

Everything in such a folder is data: its JSON files are parsed with bounds on size and depth and mapped key by key
through the tables below onto diffcli's own config (a key with no counterpart is refused in one line, never
ignored), its weights are read from `.safetensors` only (a `.bin` is a pickle, never opened), and its
`_class_name` entries choose nothing but a row of these tables.

A scheduler config maps onto diffcli's DDPM path (`num_train_timesteps`, the betas, zero terminal SNR), the
prediction, and the sampling options an imported model keeps as `model.sampler_options` (clipping, thresholding,
timestep spacing, steps_offset, set_alpha_to_one), which every sampler's `auto` settings then follow.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import DiffcliError, short

MAX_JSON = 1 << 20  # bytes of one JSON file: diffusers' configs are a few kB (1000 trained betas: 25 kB)
WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
NET = "diffcli.diffusers_net.DiffusersUNet2D"

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers' prediction_type -> diffcli's
SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine", "scaled_linear": "scaled_linear",
             "sigmoid": "sigmoid"}
# scheduler class -> the diffcli sampler its pipeline runs (DDPMPipeline: ancestral; DDIMPipeline: ddim)
SCHEDULERS = {"DDPMScheduler": "ancestral", "DDIMScheduler": "ddim"}
# scheduler keys and diffusers' defaults (DDPMScheduler's and DDIMScheduler's agree on every shared key)
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
    "rescale_betas_zero_snr": False,
}
VARIANCES = ("fixed_small",)  # DDPM's posterior variance beta~ (Ho et al. 2020, sec. 3.2), ancestral's
# UNet2DModel keys taken over as DiffusersUNet2D's arguments (same names)
UNET_ARGUMENTS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                  "attention_head_dim", "norm_num_groups", "norm_eps", "freq_shift", "flip_sin_to_cos",
                  "downsample_padding", "dropout", "mid_block_scale_factor", "add_attention", "out_channels")
# UNet2DModel keys diffcli reads only at the value that DDPM's and train_unconditional's U-Nets use
UNET_FIXED = {"center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
              "mid_block_type": "UNetMidBlock2D", "downsample_type": "conv", "upsample_type": "conv",
              "act_fn": "silu", "attn_norm_num_groups": None, "resnet_time_scale_shift": "default",
              "class_embed_type": None}
UNET_READ = ("sample_size", "in_channels", "num_class_embeds", "num_train_timesteps")
NULL_KEY = "_diffcli_null_class"  # diffcli's own entry: the embedding row of "no label" (diffusers ignores "_" keys)


def is_folder(ckpt) -> bool:
    """Whether ckpt names a diffusers folder: model_index.json, or a unet/ + scheduler/ pair."""
    if ckpt is None or not Path(str(ckpt)).is_dir():
        return False
    folder = Path(str(ckpt))
    return (folder / "model_index.json").is_file() or ((folder / "unet").is_dir() and (folder / "scheduler").is_dir())


def read_json(file: Path) -> dict:
    """A JSON mapping of at most MAX_JSON bytes and MAX_DEPTH levels, or one line saying what is wrong."""
    from .checkpoint import MAX_DEPTH, depth

    if not file.is_file():
        raise DiffcliError(f"{file} is missing; a diffusers folder holds model_index.json, unet/config.json and "
                           "scheduler/scheduler_config.json")
    if file.stat().st_size > MAX_JSON:
        raise DiffcliError(f"{file} holds {file.stat().st_size / 1e6:.1f} MB, more than a diffusers config writes "
                           f"({MAX_JSON // 1024} kB at most); the file is damaged or is not a config")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DiffcliError(f"{file} is not valid JSON ({short(e, 80)}); the folder is damaged") from None
    if not isinstance(value, dict) or depth(value) > MAX_DEPTH:
        raise DiffcliError(f"{file} is not a JSON mapping of a config; the folder is damaged")
    return value


def parts(folder: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler folder) of a pipeline folder (model_index.json names them) or a unet/ + scheduler/
    pair."""
    index = folder / "model_index.json"
    if index.is_file():
        entries = read_json(index)
        for part in ("unet", "scheduler"):
            if part not in entries:
                raise DiffcliError(f"{index} names no {part}; diffcli reads pipelines of one UNet2DModel and one "
                                   "scheduler (DDPMPipeline, DDIMPipeline)")
    return folder / "unet", folder / "scheduler"


def _scheduler(file: Path) -> dict:
    """The scheduler config with diffusers' defaults filled in; an unknown key or class is one line."""
    config = read_json(file)
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise DiffcliError(f"{file}: _class_name={short(name, 40)} has no diffcli counterpart; diffcli maps "
                           f"{' and '.join(SCHEDULERS)} configs (any of its samplers then runs on the model)")
    unknown = [k for k in config if not k.startswith("_") and k not in SCHEDULER_DEFAULTS]
    if unknown:
        raise DiffcliError(f"{file}: the key {short(unknown[0], 40)} has no counterpart in diffcli; remove it if it "
                           f"only tunes {name}'s own sampling (diffcli maps: {', '.join(SCHEDULER_DEFAULTS)})")
    return {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}, "_class_name": name}


def _path(s: dict, file: Path) -> dict:
    """The DDPMPath node of a scheduler config."""
    if s["beta_schedule"] not in SCHEDULES and s["trained_betas"] is None:
        raise DiffcliError(f"{file}: beta_schedule={short(s['beta_schedule'], 40)} has no diffcli counterpart; "
                           f"diffcli has {', '.join(SCHEDULES)} and trained_betas")
    path = {"_target_": "diffcli.paths.DDPMPath", "T": s["num_train_timesteps"],
            "schedule": SCHEDULES.get(s["beta_schedule"], "linear"), "beta_start": s["beta_start"],
            "beta_end": s["beta_end"], "zero_terminal_snr": s["rescale_betas_zero_snr"]}
    return path if s["trained_betas"] is None else {**path, "betas": s["trained_betas"]}


def sampler_options(s: dict) -> dict:
    """What a scheduler config says about sampling, as the options diffcli's samplers read (thresholding wins over
    clip_sample, as in diffusers' step)."""
    clip = "dynamic" if s["thresholding"] else "static" if s["clip_sample"] else "none"
    return {"clip_x0": clip, "clip_sample_range": s["clip_sample_range"],
            "dynamic_thresholding_ratio": s["dynamic_thresholding_ratio"], "sample_max_value": s["sample_max_value"],
            "spacing": s["timestep_spacing"], "steps_offset": s["steps_offset"],
            "set_alpha_to_one": s["set_alpha_to_one"], "use_clipped_model_output": False}  # DDIMPipeline's default


def model_node(file: Path) -> dict:
    """diffcli's `model` config of a diffusers scheduler config."""
    s = _scheduler(file)
    if s["prediction_type"] not in PREDICTIONS:
        raise DiffcliError(f"{file}: prediction_type={short(s['prediction_type'], 40)} has no diffcli counterpart; "
                           f"diffcli maps {', '.join(PREDICTIONS)}")
    if s["variance_type"] not in VARIANCES:
        raise DiffcliError(f"{file}: variance_type={short(s['variance_type'], 40)} has no diffcli counterpart; "
                           "diffcli's ancestral sampler uses DDPM's fixed_small posterior variance")
    return {"name": "ddpm", "path": _path(s, file), "prediction": PREDICTIONS[s["prediction_type"]],
            "weighting": "simple", "sampler": SCHEDULERS[s["_class_name"]], "sampler_options": sampler_options(s)}


def net_node(file: Path, T: int, null_class=None) -> tuple[dict, tuple, int]:
    """(DiffusersUNet2D's net node, the data shape, the class count) of a UNet2DModel config."""
    from .checkpoint import MAX_SAMPLE_NUMEL
    from .ranges import MAX_CLASSES

    config = read_json(file)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DiffcliError(f"{file}: _class_name={short(config.get('_class_name'), 40)}; diffcli reads UNet2DModel "
                           "networks (pixel-space pipelines such as DDPMPipeline and DDIMPipeline)")
    unknown = [k for k in config if not k.startswith("_") and k not in (*UNET_ARGUMENTS, *UNET_FIXED, *UNET_READ)]
    fixed = next((k for k, v in UNET_FIXED.items() if config.get(k, v) != v), None)
    if unknown or fixed:
        key = unknown[0] if unknown else fixed
        raise DiffcliError(f"{file}: {key}={short(config.get(key), 40)} has no counterpart in diffcli's "
                           f"DiffusersUNet2D (it builds {', '.join(f'{k}={v}' for k, v in UNET_FIXED.items())})")
    size, channels = config.get("sample_size"), config.get("in_channels", 3)
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if (type(size) is not int or type(channels) is not int or size <= 0 or channels <= 0
            or channels * size * size > MAX_SAMPLE_NUMEL):
        raise DiffcliError(f"{file}: sample_size={short(size, 20)} and in_channels={short(channels, 20)} must be "
                           f"positive integers (square images of at most {MAX_SAMPLE_NUMEL} numbers)")
    null = config.get(NULL_KEY) if null_class is None else null_class
    embeds = config.get("num_class_embeds") or 0
    if type(embeds) is not int or not 0 <= embeds <= MAX_CLASSES + 1:
        raise DiffcliError(f"{file}: num_class_embeds={short(embeds, 20)} must be an integer in [0, {MAX_CLASSES + 1}]")
    if null is not None and not (type(null) is int and 0 <= null < embeds):
        raise DiffcliError(f"{file}: null_class={short(null, 20)} must be one of the model's {embeds} class "
                           "embeddings")
    n_classes = embeds - (null is not None)
    net = {"_target_": NET, "T": T, **{k: config[k] for k in UNET_ARGUMENTS if k in config}, "null_class": null}
    return net, (channels, size, size), n_classes


def data_node(shape: tuple, data: str | None) -> dict:
    """The data a model was trained on: a shipped data config by name (for eval's reference images), or an
    unnamed image set of the model's shape."""
    if data is None:
        return {"name": "diffusers", "kind": "folder", "path": None, "image_size": shape[1], "channels": shape[0]}
    file = _shipped("data", data) if data.isidentifier() else None
    node = OmegaConf.to_container(OmegaConf.load(str(file)), resolve=False) if file and file.is_file() else {}
    if node.get("kind") != "torchvision":
        raise DiffcliError(f"data={data} is not one of diffcli's image sets (mnist, fashion_mnist, cifar10); leave "
                           "it out for other images")
    node.pop("defaults", None)
    node["root"] = None  # eval's own data.root says where the files are (a stored config never does)
    return node


def folder_config(folder, null_class=None, data: str | None = None) -> tuple[DictConfig, tuple]:
    """(diffcli's training config, data shape) of a diffusers folder, from its JSON alone (no torch): typed and
    range-checked as a stored config is."""
    from .checkpoint import stored_config

    folder = Path(str(folder))
    unet, scheduler = parts(folder)
    model = model_node(scheduler / "scheduler_config.json")
    net, shape, n_classes = net_node(unet / "config.json", model["path"]["T"], null_class)
    if n_classes:
        model |= {"cond": "class", "n_classes": n_classes}
    train = OmegaConf.to_container(OmegaConf.load(str(_shipped("train", "quick"))))
    train.pop("defaults", None)
    config = {"net": net, "model": model, "data": data_node(shape, data), "train": train}
    config = stored_config({"config": json.dumps(config)}, folder)
    return config, shape


def _shipped(group: str, name: str):
    from importlib.resources import files

    return files("diffcli.configs").joinpath(group, f"{name}.yaml")


def weights_file(folder) -> Path:
    """The UNet's safetensors file; a folder holding only a pickled `.bin` is refused (never opened)."""
    unet = parts(Path(str(folder)))[0]
    file = unet / WEIGHTS
    if file.is_file():
        return file
    pickled = next((unet / p for p in PICKLES if (unet / p).is_file()), None)
    if pickled is not None:
        raise DiffcliError(f"{pickled} is a pickle, which diffcli never opens (loading one can run any code); convert "
                           f"it to {WEIGHTS} where you trust it (UNet2DModel.from_pretrained(...).save_pretrained(..., "
                           "safe_serialization=True))")
    raise DiffcliError(f"{unet} holds no {WEIGHTS}; a diffusers folder's UNet weights are needed")


def read_weights(folder) -> dict:
    """The UNet's tensors under DiffusersUNet2D's names (`unet.` + diffusers' own)."""
    from safetensors import safe_open

    file = weights_file(folder)
    try:
        with safe_open(str(file), framework="pt") as f:
            return {f"unet.{k}": f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DiffcliError(f"{file} is not a readable safetensors file ({short(e, 80)}); the folder is damaged") from None


def read_folder(folder, null_class=None, data: str | None = None):
    """(state_dict, config, step, shape) of a diffusers folder, as checkpoint.load_ema gives for a diffcli file."""
    config, shape = folder_config(folder, null_class, data)
    return read_weights(folder), config, 0, shape


# ------------------------------------------------------------------------------------------- writing a folder

VERSION = "0.30.0"  # the diffusers version an exported folder names when diffusers is not installed here
PIPELINES = {"ancestral": ("DDPMPipeline", "DDPMScheduler")}  # any other default sampler: DDIMPipeline
EXPORTABLE = {v: k for k, v in PREDICTIONS.items()}  # diffcli's prediction -> diffusers' prediction_type


def scheduler_config(model_cfg: DictConfig, path) -> dict:
    """The DDPMScheduler / DDIMScheduler config of a diffcli DDPM model (its own sampler_options when imported, else
    diffcli's defaults: x0 clipped to [-1, 1], leading spacing, trailing with zero terminal SNR)."""
    from .paths import DDPMPath

    if not isinstance(path, DDPMPath) or model_cfg.get("precond", "none") != "none":
        raise DiffcliError(f"model={model_cfg.name} (path {type(path).__name__}, precond "
                           f"{model_cfg.get('precond', 'none')}) cannot be exported: diffusers' DDPM and DDIM "
                           "schedulers express DDPM's discrete path only (model=ddpm), not flows, VE/VP SDEs or EDM")
    if model_cfg.prediction not in EXPORTABLE:
        raise DiffcliError(f"model.prediction={model_cfg.prediction} cannot be exported: diffusers' schedulers take "
                           f"{', '.join(EXPORTABLE)} (prediction_type {', '.join(PREDICTIONS)})")
    node = OmegaConf.to_container(model_cfg.path)
    o = {"clip_x0": "static", "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
         "spacing": "trailing" if path.zero_terminal_snr else "leading", "steps_offset": 0, "set_alpha_to_one": True,
         **(OmegaConf.to_container(model_cfg.sampler_options) if model_cfg.get("sampler_options") else {})}
    schedule = {v: k for k, v in SCHEDULES.items()}[path.schedule]
    return {"_class_name": PIPELINES.get(model_cfg.sampler, ("DDIMPipeline", "DDIMScheduler"))[1],
            "num_train_timesteps": path.T, "beta_start": node.get("beta_start", 1e-4),
            "beta_end": node.get("beta_end", 0.02), "beta_schedule": schedule,
            "trained_betas": node.get("betas"), "rescale_betas_zero_snr": path.zero_terminal_snr,
            "prediction_type": EXPORTABLE[model_cfg.prediction], "variance_type": "fixed_small",
            "clip_sample": o["clip_x0"] == "static", "clip_sample_range": o["clip_sample_range"],
            "thresholding": o["clip_x0"] == "dynamic", "dynamic_thresholding_ratio": o["dynamic_thresholding_ratio"],
            "sample_max_value": o["sample_max_value"], "timestep_spacing": o["spacing"],
            "steps_offset": o["steps_offset"], "set_alpha_to_one": o["set_alpha_to_one"]}


def unet_files(net, T: int, n_classes: int) -> tuple[dict, dict]:
    """(UNet2DModel config, its tensors) of a diffcli network: DiffusersUNet2D as it is, diffcli's U-Net mapped
    layer by layer (diffusers_map)."""
    from .diffusers_net import DiffusersUNet2D

    if isinstance(net, DiffusersUNet2D):
        config = {k: v for k, v in dict(net.unet.config).items() if not k.startswith("_")}
        state, null = net.unet.state_dict(), net.null_class
    else:
        from .diffusers_map import unet2d_config, unet2d_state

        config, state, null = unet2d_config(net, T), unet2d_state(net, T), n_classes
    config = {"_class_name": "UNet2DModel", "_diffusers_version": _version(),
              **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    if n_classes and null is not None:
        config[NULL_KEY] = null
    return config, state


def _version() -> str:
    try:
        from diffusers import __version__
    except ImportError:
        return VERSION
    return __version__


def write_folder(folder: Path, unet_config: dict, state: dict, scheduler: dict) -> None:
    """A DDPMPipeline / DDIMPipeline folder, written beside `folder` and renamed into place (a crash leaves none)."""
    from safetensors.torch import save_file

    from .runs import atomic_folder

    try:
        with atomic_folder(folder, "an export") as tmp:
            (tmp / "unet").mkdir()
            (tmp / "scheduler").mkdir()
            pipeline = "DDPMPipeline" if scheduler["_class_name"] == "DDPMScheduler" else "DDIMPipeline"
            index = {"_class_name": pipeline, "_diffusers_version": _version(), "unet": ["diffusers", "UNet2DModel"],
                     "scheduler": ["diffusers", scheduler["_class_name"]]}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            (tmp / "unet/config.json").write_text(json.dumps(unet_config, indent=2))
            (tmp / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
            tensors = {k: v.detach().to("cpu", torch_float(v)).contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / "unet" / WEIGHTS), metadata={"format": "pt"})
    except OSError as e:
        raise DiffcliError(f"cannot write {folder} ({e.strerror or e}); give a writable folder") from None


def torch_float(v):
    """float32 for floating tensors (diffusers' pipelines run float32), the tensor's own dtype otherwise."""
    import torch

    return torch.float32 if v.is_floating_point() else v.dtype
