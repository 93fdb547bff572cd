"""`diffcli <command> --help` and the config tables of docs/reference/configs.md, both generated from the configs and the schema.

What a command accepts is its schema (diffcli/schema.py) and the groups its primary config composes; the
text here only describes those keys. tests/test_help.py checks that every key described exists and that every
key and group a command reads is listed, so the help cannot drift from the code.
"""

from __future__ import annotations

from importlib.resources import files

from omegaconf import DictConfig, OmegaConf

from .schema import DISTILL_TRAIN_KEYS, SCHEMAS, all_groups, command_groups

COMMANDS = {
    "train": "fit a formulation (model=) on a dataset (data=) with a network (net=)",
    "sample": "draw samples from a trained checkpoint; its data, model, net and train settings come from it",
    "eval": "sample a checkpoint and score the samples against fresh data (metrics.json)",
    "edit": "inpaint, colorize, SDEdit, encode/decode/interpolate or solve y = A x0 + n with a checkpoint (edited.npz)",
    "distill": "a few-step student of a teacher (reflow or consistency distillation), written as a training run",
}

# group -> (what it chooses, {key below it: one line}); a key ending in `.*` stands for a class's own arguments
GROUPS = {
    "data": ("the dataset; toys are generated on the fly, and each dataset brings its own net= and train= preset", {
        "params": "a toy's parameters (noise, scale, means, ...)",
        "root": "where torchvision datasets live ($DIFFCLI_DATA, else ~/.cache/diffcli)",
        "download": "fetch missing files through torchvision (false: a missing file is an error)",
        "split": "train | test",
        "path": "data=npz: the .npz file; data=folder: the image folder",
    }),
    "model": ("the formulation: a probability path, what the network predicts and how it is trained", {
        "path.*": "the path's arguments (T, schedule, sigma_min, sigma_max, beta_min, beta_max, eps, ...)",
        "prediction": "eps | x0 | score | v | velocity | F (consistency: a distilled consistency model's)",
        "weighting": "simple | sigma2 | likelihood | edm | min_snr",
        "precond": "none | edm: what the network is fed",
        "times.dist": "uniform | lognormal | logit_normal: the training times",
        "sigma_data": "EDM's sigma_data (prediction F, precond edm, weighting edm)",
        "cond": "none | class: a class-conditional model (label dropout train.p_uncond)",
        "sampler": "the formulation's own sampler, used when sampler= is not given",
        "prior": "flow: gaussian | uniform",
        "coupling": "flow: independent | ot (mini-batch optimal transport)",
    }),
    "net": ("the network (MLP for 2D, U-Nets for images, the exact oracle, noise-conditional classifiers)", {
        "net.*": "the network class's arguments (mlp: hidden, depth, emb_dim; U-Nets: ch, ch_mult, "
                 "attn_resolutions, dropout; time_embedding, time_scale), checked against its signature",
    }),
    "sampler": ("the sampler; unset: the formulation's own (model.sampler)", {
        "steps": "sampling steps (null: the sampler's default; top-level steps= sets it too)",
        "fn.*": "the sampler's options (eta, s_churn, n_steps, rtol, ...), checked against its signature",
        "fn.clip_x0": "ddim, ancestral: auto | static | dynamic | none (auto: x0_hat clamped to [-1, 1] for images only)",
        "grid.*": "the time grid (name: uniform | linear | quadratic | karras | logsnr | ddim | levels | ends; spacing, ...)",
    }),
    "train": ("the training preset: default (images, DDPM's 100k-step recipe), quick (images in minutes) or toy "
              "(2D, about a minute on a CPU)", {
        "steps": "optimizer steps",
        "batch_size": "the global batch of one step (all GPUs and accumulation steps together)",
        "lr": "peak learning rate (AdamW)",
        "warmup": "linear learning-rate warm-up, in steps",
        "lr_schedule": "constant | cosine: the learning rate after the warm-up (cosine decays it to 0 at the last step)",
        "ema.decay": "EMA decay of the sampled weights (ema.warmup: its warm-up)",
        "precision": "auto | fp32 | bf16 | fp16 (auto: bf16 where bf16 has its own units: AMX CPUs, CUDA)",
        "compile": "auto | true | false: torch.compile the network (auto: long image runs on CUDA or AMX CPUs)",
        "channels_last": "auto | true | false: the NHWC memory layout for image nets (auto: on CUDA, or when compiled)",
        "sample_every": "a picture of EMA samples every N steps and at the last step (0: never)",
        "eval_every": "a cheap metric of EMA samples to eval.jsonl every N steps (0: never)",
        "ckpt_every": "a checkpoint every N steps (and at the last)",
        "resume": "a run folder to continue, in that folder",
    }),
    "metric": ("what eval scores: auto picks the usual metrics for the data", {
        "names": "a metric or a list: sliced_wasserstein, mmd, energy, modes, nll (2D); fid, kid, cfid, bpd (images); "
                 "straightness (both)",
        "n_reference": "real images in the reference set (null: all)",
        "nll_n": "data points (2D) or held-out images whose likelihood is computed",
        "straightness_n": "straightness: trajectories from the prior, each by straightness_steps Euler steps",
        "inception_weights": "a local Inception file for FID/KID (null: torch hub's cache)",
        "cache_dir": "where reference features and classifiers are cached",
    }),
    "logger": ("experiment trackers beside log.jsonl: tensorboard, mlflow, wandb, csv; several: logger=[tensorboard,mlflow]"
               " (eval: the metrics join the training run's)", {
        "tensorboard.images": "the sample pictures as TensorBoard images",
        "mlflow.tracking_uri": "the tracking store (default sqlite:///outputs/mlflow.db, artifacts beside it) or a "
                               "team's server (http://host:5000)",
        "mlflow.experiment": "null: the sweep's folder for a multirun (a run per job), else 'diffcli <command>'",
        "mlflow.checkpoint": "the final EMA checkpoint as an artifact",
        "wandb.mode": "offline (default; wandb sync uploads <run>/wandb/) | online | disabled",
        "wandb.project": "the W&B project (wandb.entity: your team or user)",
        "flush_timeout": "seconds the end of a run waits for the trackers (a hung server is left behind, warned)",
    }),
}

# top-level keys (and the `sample.` options) -> one line
KEYS = {
    "ckpt": "a training run folder or an ema_<step>.safetensors file (null: the newest run under ./outputs/)",
    "n": "number of samples (sample's null: 2000 points for 2D data, 64 images; edit: the first n inputs, null: all)",
    "batch_size": "samples per batch (eval's null: 1000 for 2D points, 256 for images)",
    "steps": "sampling steps (null: the sampler's default)",
    "eta": "DDIM's stochasticity (0: deterministic, 1: ancestral-like)",
    "seed": "random seed",
    "device": "auto | cpu | cuda | cuda:<index>",
    "precision": "auto | fp32 | bf16 | fp16: the network's arithmetic; the sampler's stays fp32 (auto: by device)",
    "compile": "auto | true | false: torch.compile the network (auto: image runs of n x steps >= 50,000)",
    "channels_last": "auto | true | false: NHWC images (auto: on CUDA, or when compiled)",
    "net_class": "your own network class (dotted name) a checkpoint was trained with: named here, never read from it",
    "label": "conditional models: every sample of this class",
    "labels": "conditional models: these classes, cycled over the samples",
    "guidance": "guidance weight w (0: unconditional, 1: conditional, > 1: guided)",
    "guide": "autoguidance: the checkpoint of a weaker model of the same path and data",
    "guidance_interval": "[lo, hi]: guide only where lo < sigma/alpha <= hi",
    "classifier": "classifier guidance: the checkpoint of a noise-conditional classifier",
    "classifier_scale": "classifier guidance scale s (1: Bayes' conditional score)",
    "sample.save_trajectory": "keep the visited states (samples.npz trajectory) and draw trajectories.png",
    "sample.plot_field": "2D: draw the learned score or velocity as arrows (field.png)",
    "data.root": "eval, distill: where torchvision datasets live ($DIFFCLI_DATA, else ~/.cache/diffcli); never the checkpoint's",
    "data.path": "eval (distill) of a data=npz/folder model: the .npz file or image folder to score against (required there)",
    "data.download": "eval, distill: fetch missing torchvision files (false: a missing file is an error)",
    "task": "edit: inpaint | colorize | sdedit | encode | decode | interpolate | dps",
    "method": "edit task=inpaint: replace (score_sde) | repaint (RePaint's resampling) | dps; distill: reflow | consistency",
    "input": "edit: an image file or folder, an .npz (images, samples, results, noise) or .npy; 2D: NaN = unknown",
    "mask": "edit: the pixels to fill: bottom | top | left | right, [x0,y0,x1,y1], all, none or a mask image (white)",
    "strength": "edit task=sdedit: the time the inputs are noised to (0: unchanged, 1: a fresh sample)",
    "jump_length": "edit method=repaint: steps of one jump back up",
    "jump_n_sample": "edit method=repaint: times each jump is taken (1: no resampling)",
    "operator": "edit task=dps: mask | blur | down<k> (k x k box averages)",
    "sigma_y": "edit task=dps: the measurement noise",
    "scale": "edit task=dps: the step size (the DPS reference: 0.3 to 1.0)",
    "frames": "edit task=interpolate: points per pair, both ends included",
    "teacher": "distill: the teacher, a training run folder, an ema_<step>.safetensors or a diffusers folder",
    "sample_steps": "distill: the student's default sampling steps (1-4)",
    "init": "distill: auto | teacher | random: the student's first weights (auto: the teacher's, same network)",
    "reflow.pairs": "distill method=reflow: a pair folder to reuse or continue (null: <run>/pairs)",
    "reflow.n": "distill method=reflow: (noise, teacher sample) pairs drawn and trained on",
    "reflow.part_size": "distill method=reflow: pairs per file (the most a killed draw loses)",
    "consistency.N": "distill method=consistency: levels of the teacher's ODE (18 in Song et al. 2023)",
    "consistency.mu": "distill method=consistency: the target network's EMA decay",
    "consistency.solver": "distill method=consistency: euler | heun, the teacher's ODE step",
    "consistency.distance": "distill method=consistency: l2 | pseudo_huber",
    **{f"train.{k}": f"distill: the student's train.{k} (null: the teacher's)" for k in DISTILL_TRAIN_KEYS},
    "objective.metric": "train: score train.eval_n EMA samples at the end (metrics.json) and return it to Hydra's sweeper"
                        ": sliced_wasserstein, mmd, energy_distance, modes_covered, in_modes (2D); cfid, confidence, "
                        "class_entropy (labelled images)",
    "objective.direction": "train: auto (the metric's own) | minimize | maximize; hydra/sweeper=optuna follows it",
}


def options(group: str) -> list[str]:
    """The options of a config group: its YAML files."""
    return sorted(p.name[:-5] for p in files("diffcli.configs").joinpath(group).iterdir() if p.name.endswith(".yaml"))


def primary(command: str) -> DictConfig:
    """A command's primary config (unresolved) on its schema: the keys it reads and their defaults."""
    node = OmegaConf.load(files("diffcli.configs").joinpath(f"{command}.yaml"))
    node.pop("defaults", None), node.pop("hydra", None)
    return OmegaConf.merge(OmegaConf.structured(SCHEMAS[f"{command}_schema"]), node)


def top_keys(command: str) -> dict[str, object]:
    """The keys a command reads outside its groups (dotted below plain nodes such as `sample.`), with defaults."""
    cfg, groups, out = primary(command), command_groups(command), {}
    for key in cfg:
        if key in groups:
            continue
        value = cfg._get_node(key)
        if isinstance(value, DictConfig) and value._is_none():  # written by a command (train's `distill`), not set
            continue
        if isinstance(value, DictConfig):
            out |= {f"{key}.{k}": v for k, v in OmegaConf.to_container(value, resolve=False).items()}
        else:
            out[key] = OmegaConf.to_container(cfg, resolve=False)[key]
    return out


def _value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def command_help(command: str) -> str:
    """The text of `diffcli <command> --help`: only the groups and keys this command reads."""
    lines = [f"diffcli {command}: {COMMANDS[command]}", "",
             f"usage: diffcli {command} [group=option ...] [key=value ...] [-m] [--cfg job]", "", "groups:"]
    for group in command_groups(command):
        what, keys = GROUPS[group]
        lines += [f"  {group}=  {', '.join(options(group))}", f"      {what}"]
        lines += [f"      {_dotted(group, k):<25} {line}" for k, line in keys.items()]
    keys = {f"{k}={_value(v)}": KEYS[k] for k, v in top_keys(command).items()}
    width = max(map(len, keys)) + 1
    lines += ["", "keys:", *(f"  {k:<{width}} {line}" for k, line in keys.items())]
    lines += ["", f"Any other key or group is refused. `diffcli {command} --cfg job` prints the composed config;",
              "-m runs a sweep (e.g. model=ddpm,flow); --hydra-help lists Hydra's own flags.", ""]
    return "\n".join(lines)


def _dotted(group: str, key: str) -> str:
    return key if key.startswith(f"{group}.") else f"{group}.{key}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a Markdown table cell


def group_table() -> str:
    """The config-group table of docs/reference/configs.md (python scripts/config_tables.py prints it)."""
    rows = ["| group | commands | options | what | main keys |", "|---|---|---|---|---|"]
    for group in all_groups():
        what, keys = GROUPS[group]
        commands = [c for c in COMMANDS if group in command_groups(c)]
        rows.append(f"| `{group}` | {', '.join(commands)} | {', '.join(f'`{o}`' for o in options(group))} | {_cell(what)} | "
                    + ", ".join(f"`{_dotted(group, k)}`" for k in keys) + " |")
    return "\n".join(rows)


def key_table() -> str:
    """The table of top-level keys (docs/reference/configs.md): which commands read each, its default and what it does."""
    defaults = {c: top_keys(c) for c in COMMANDS}
    rows = ["| key | " + " | ".join(f"`{c}` default" for c in COMMANDS) + " | what |", "|---" * (len(COMMANDS) + 2) + "|"]
    for key in dict.fromkeys(k for c in COMMANDS for k in defaults[c]):
        cells = [f"`{_value(defaults[c][key])}`" if key in defaults[c] else "-" for c in COMMANDS]
        rows.append(f"| `{key}` | " + " | ".join(cells) + f" | {_cell(KEYS[key])} |")
    return "\n".join(rows)
