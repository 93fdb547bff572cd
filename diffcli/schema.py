"""The configs' schema: typed dataclasses in Hydra's ConfigStore, checked by Hydra before any work.

train.yaml, sample.yaml and eval.yaml list `<command>_schema` first in their defaults, so every
YAML file, command-line override and stored config is merged onto these types: a word where a
number belongs, a float where an integer belongs or an unknown key ends in one line (cli.py),
with or without Hydra's `+`. The leaves a class consumes (`net`, `model.path`, `sampler.fn`,
`data.params`) are typed by that class's own signature instead (diffcli/build.py). Ranges are
checked in code (`ranges.check_ranges`), since a type cannot say "positive".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig

from . import DiffcliError


@dataclass
class EMAConfig:
    decay: float = MISSING
    warmup: int = MISSING


@dataclass
class TrainConfig:
    steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    betas: List[float] = MISSING
    weight_decay: float = MISSING
    warmup: int = MISSING
    lr_schedule: str = "constant"     # constant | cosine (after the warm-up); runs saved before it are constant
    grad_clip: Optional[float] = MISSING
    ema: EMAConfig = field(default_factory=EMAConfig)
    precision: str = MISSING          # auto | fp32 | bf16 | fp16
    grad_accum: int = MISSING
    compile: Any = MISSING            # auto | true | false
    channels_last: Any = MISSING  # auto | true | false
    max_nonfinite: int = MISSING
    log_every: int = MISSING
    sample_every: int = MISSING
    n_samples: int = MISSING
    eval_every: int = MISSING
    eval_n: int = MISSING
    ckpt_every: int = MISSING
    keep_last: int = MISSING
    resume: Optional[str] = None
    p_uncond: float = 0.1             # model.cond=class: share of labels replaced by "no label" (Ho & Salimans 2022)


@dataclass
class DataConfig:
    name: str = MISSING
    kind: str = MISSING
    params: Optional[Any] = None      # a toy's keyword arguments, checked against its function
    root: Optional[str] = None        # torchvision sets
    download: bool = False
    split: str = "train"
    path: Optional[str] = None        # npz file or image folder
    image_size: int = 32              # folder
    channels: int = 3                 # folder
    hflip: bool = False
    sigma_max: Optional[float] = None


@dataclass
class TimesConfig:
    dist: str = "uniform"             # uniform | lognormal (in sigma/alpha) | logit_normal (diffcli/paths.py)
    mean: Optional[float] = None      # of the normal; null: the distribution's own (lognormal -1.2, logit_normal 0)
    std: Optional[float] = None       # null: lognormal 1.2, logit_normal 1


@dataclass
class ModelConfig:
    name: str = MISSING
    path: Any = MISSING               # the path class and its arguments (diffcli/build.py)
    prediction: str = MISSING
    weighting: str = MISSING
    sampler: str = MISSING
    prior: Optional[str] = None       # flow only
    coupling: Optional[str] = None    # flow only
    # defaults below keep configs and checkpoints written before these keys existed as they were
    precond: str = "none"             # none | edm: what the network is fed (diffcli/prediction.py)
    sigma_data: float = 0.5           # EDM's sigma_data: prediction F, precond edm, weighting edm
    times: TimesConfig = field(default_factory=TimesConfig)  # the training-time distribution
    snr_gamma: float = 5.0            # weighting min_snr
    cond: str = "none"                # none | class: a label embedding, trained with train.p_uncond label dropout
    n_classes: Optional[int] = None   # set from the data when cond=class, so the checkpoint records it
    class_names: Optional[List[str]] = None
    # an imported diffusers scheduler's sampling settings (clip_x0, spacing, steps_offset, ...), which the
    # samplers' `auto` options follow (diffcli/diffusers_format.py, sampling.model_options)
    sampler_options: Optional[Any] = None
    # a consistency model's boundary (prediction=consistency, written by diffcli distill): f(x, t) = x~ where
    # sigma/alpha = sigma_min (Song et al. 2023, eq. 3 and appendix C)
    sigma_min: Optional[float] = None


@dataclass
class SamplerConfig:
    fn: Any = MISSING                 # a sampler of diffcli.samplers and its options (diffcli/build.py)
    grid: Any = MISSING               # name: one of samplers.GRIDS, and its arguments
    steps: Optional[int] = None
    default_steps: Optional[int] = None
    continuous_steps: Optional[int] = None


@dataclass
class DistillRecord:
    """What a distilled run was distilled from, stored with it (diffcli distill): the loop reads its method, and the
    teacher, its pairs or ODE steps, so that train.resume continues it."""

    method: str = MISSING             # reflow | consistency
    teacher: str = MISSING            # the teacher's checkpoint file or diffusers folder
    teacher_step: int = 0
    sampler: str = ""                 # what drew the pairs / stepped the ODE (the teacher's sampler, its grid)
    nfe: Optional[int] = None         # the teacher's NFE per pair
    guidance: float = 1.0             # the classifier-free guidance weight distilled in
    pairs: Optional[str] = None       # reflow: the pair folder
    n_pairs: Optional[int] = None     # reflow: the pairs trained on
    N: Optional[int] = None           # consistency: the discretization levels
    mu: Optional[float] = None        # consistency: the target network's EMA decay
    solver: Optional[str] = None      # consistency: the teacher's ODE step (euler | heun)
    distance: Optional[str] = None    # consistency: l2 | pseudo_huber


@dataclass
class TensorBoardLogger:                # the values: configs/logger/<name>.yaml, as every group's
    images: bool = MISSING


@dataclass
class MLflowLogger:
    tracking_uri: str = MISSING
    experiment: Optional[str] = MISSING
    checkpoint: bool = MISSING


@dataclass
class WandbLogger:
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: str = MISSING
    images: bool = MISSING


@dataclass
class CsvLogger:
    pass


@dataclass
class LoggerConfig:
    """logger=tensorboard|mlflow|wandb|csv (several: logger=[a,b]); an unchosen tracker stays null (loggers.py)."""

    tensorboard: Optional[TensorBoardLogger] = None
    mlflow: Optional[MLflowLogger] = None
    wandb: Optional[WandbLogger] = None
    csv: Optional[CsvLogger] = None
    flush_timeout: float = 30.0       # seconds the end of a run waits for the trackers to write what is queued


@dataclass
class Objective:
    """What diffcli train returns to Hydra's sweeper (hydra/sweeper=optuna): a metric of its EMA samples at the end."""

    metric: Optional[str] = None      # null: none; scoring.OBJECTIVES lists the names (sliced_wasserstein, cfid, ...)
    direction: str = "auto"           # auto (the metric's own) | minimize | maximize


@dataclass
class TrainApp:
    net: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: Optional[SamplerConfig] = None
    seed: int = 0
    device: str = "auto"
    steps: Optional[int] = None
    eta: float = 0.0
    distill: Optional[DistillRecord] = None  # a student of diffcli distill: its teacher and method
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    objective: Objective = field(default_factory=Objective)


@dataclass
class SampleOptions:
    save_trajectory: bool = False
    plot_field: bool = False


@dataclass
class MetricConfig:
    names: Any = MISSING              # auto, a name or a list of names (evaluate.resolve_names)
    cache_dir: str = MISSING
    inception_weights: Optional[str] = None
    batch_size: int = MISSING
    reference_split: Optional[str] = None
    n_reference: Optional[int] = None
    kid_subsets: int = MISSING
    kid_subset_size: int = MISSING
    classifier_epochs: Optional[int] = None
    nll_n: int = MISSING
    probes: int = MISSING
    straightness_n: int = 500         # straightness: trajectories from the prior
    straightness_steps: int = 100     # straightness: Euler steps along each
    rtol: float = MISSING
    atol: float = MISSING


@dataclass
class SamplingOptions:
    """What every command that samples a checkpoint reads (sample, eval): the one base of their schemas."""

    sampler: Optional[SamplerConfig] = None
    ckpt: Optional[str] = None
    net_class: Optional[str] = None   # your own network class, named on this command line (never from a file)
    steps: Optional[int] = None
    eta: float = 0.0
    batch_size: Optional[int] = MISSING  # null: sampling.DEFAULT_BATCH for the data's kind
    seed: int = 0
    device: str = "auto"
    label: Optional[int] = None       # conditional models: every sample of this class
    labels: Optional[List[int]] = None  # or these classes, cycled over the n samples; neither: an even spread
    guidance: float = 1.0             # guidance weight w: classifier-free, or autoguidance with guide=
    guide: Optional[str] = None       # autoguidance: the checkpoint (or run folder) of a weaker model
    guidance_interval: Optional[List[float]] = None  # [lo, hi]: guide only where lo < sigma/alpha <= hi
    classifier: Optional[str] = None  # classifier guidance: the checkpoint (or run) of a noise-conditional classifier
    classifier_scale: float = 1.0     # s in score + s grad log p_t(y | x_t); 1 is Bayes' conditional score
    precision: str = "auto"           # auto | fp32 | bf16 | fp16: the network's autocast (the sampler stays fp32)
    compile: Any = "auto"             # auto | true | false: torch.compile the network (auto: when n x steps repays it)
    channels_last: Any = "auto"       # auto | true | false: NHWC images (auto: on CUDA, or when compiled)


@dataclass
class SampleApp(SamplingOptions):
    n: Optional[int] = None           # null: sampling.DEFAULT_N for the data's kind
    sample: SampleOptions = field(default_factory=SampleOptions)


@dataclass
class EvalApp(SamplingOptions):
    @dataclass
    class Data:
        """Where eval reads real data: the command's own, never a checkpoint's (data.located)."""

        root: str = MISSING            # torchvision sets
        path: Optional[str] = None     # the .npz file or image folder a data=npz/folder model was trained on
        download: bool = False         # fetch missing torchvision files

    n: int = MISSING
    metric: MetricConfig = field(default_factory=MetricConfig)
    data: Data = field(default_factory=Data)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class EditApp(SamplingOptions):
    task: str = "inpaint"             # inpaint | colorize | sdedit | encode | decode | interpolate | dps (edit.TASKS)
    method: str = "replace"           # inpaint: replace | repaint | dps
    input: Optional[str] = None       # image file or folder, .npz (images, samples, results, noise) or .npy
    mask: Any = None                  # inpaint / dps: the pixels to fill (null: bottom half; 2D points: their NaN)
    n: Optional[int] = None           # at most the first n inputs (null: all)
    strength: float = 0.5             # sdedit: the time the inputs are noised to (0: unchanged, 1: a fresh sample)
    jump_length: int = 10             # repaint: the steps of one jump back up
    jump_n_sample: int = 10           # repaint: the times each jump is taken (1: no resampling)
    operator: str = "mask"            # dps: mask | blur | down<k>
    sigma_y: float = 0.05             # dps: the measurement noise
    scale: float = 1.0                # dps: the step size (DPS's reference: 0.3 super-resolution, 0.5 inpainting)
    frames: int = 8                   # interpolate: the points between and at each pair's ends


def _optional(node: type, name: str, keys=None) -> type:
    """A dataclass of `node`'s fields `keys` (all: None), each optional with default None (nested ones likewise):
    a command line's changes to a stored config, where None keeps the stored value."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(node)
    made = []
    for key in keys or [f.name for f in dataclasses.fields(node)]:
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            sub = _optional(hint, f"{name}{key.title()}")
            made.append((key, sub, field(default_factory=sub)))
        else:
            made.append((key, Optional[hint], field(default=None)))
    return dataclasses.make_dataclass(name, made)


# the student's training settings that diffcli distill may change; null takes the teacher's own
DISTILL_TRAIN_KEYS = ("steps", "batch_size", "lr", "warmup", "lr_schedule", "grad_clip", "ema", "precision", "compile",
                      "channels_last", "log_every", "sample_every", "n_samples", "eval_every", "eval_n", "ckpt_every",
                      "keep_last")
DistillTrain = _optional(TrainConfig, "DistillTrain", DISTILL_TRAIN_KEYS)


@dataclass
class ReflowConfig:
    pairs: Optional[str] = None       # a pair folder to reuse or continue; null: <run>/pairs
    n: int = MISSING                  # pairs drawn from the teacher (and trained on)
    part_size: int = MISSING          # pairs per file: what a killed draw loses at most


@dataclass
class ConsistencyConfig:
    N: int = MISSING                  # discretization levels of the teacher's ODE (Song et al. 2023: 18 on CIFAR-10)
    mu: float = MISSING               # the target network's EMA decay
    solver: str = MISSING             # euler | heun: the teacher's ODE step
    distance: str = MISSING           # l2 | pseudo_huber


@dataclass
class DistillApp:
    teacher: Optional[str] = None     # a training run folder, an ema_<step>.safetensors, or a diffusers folder
    net_class: Optional[str] = None
    method: str = MISSING             # reflow | consistency
    sampler: Optional[SamplerConfig] = None
    steps: Optional[int] = None
    eta: float = 0.0
    guidance: float = 1.0             # a conditional teacher's classifier-free guidance weight, distilled in
    sample_steps: int = MISSING       # the student's default sampling steps
    init: str = MISSING               # auto | teacher | random: the student's first weights
    net: Any = None                   # the student's network (null: the teacher's)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    train: DistillTrain = field(default_factory=DistillTrain)
    data: EvalApp.Data = field(default_factory=EvalApp.Data)
    seed: int = 0
    device: str = "auto"
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # the student's trackers (never the teacher's)


SCHEMAS = {"distill_schema": DistillApp, "train_schema": TrainApp, "sample_schema": SampleApp, "eval_schema": EvalApp, "edit_schema": EditApp}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore and the run-folder resolver in OmegaConf (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)
    from .runs import new_dir

    OmegaConf.register_new_resolver("diffcli.new_dir", new_dir, replace=True)
    from .ranges import objective_direction

    OmegaConf.register_new_resolver("diffcli.direction", objective_direction, replace=True)  # Optuna's, cli.py


def validate(cfg, schema: type, source: str) -> DictConfig:
    """cfg (a config or plain dict) merged onto `schema`: one line for an unknown key or a value of the wrong type.

    Hydra lets `+key=value` through unchecked; merging onto the schema again catches it (and a
    stored config read from a file gets the same check). Interpolations stay unresolved.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    plain = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), plain)
    except OmegaConfBaseException as e:
        raise DiffcliError(f"{source}: {config_error(e)}") from None


def config_error(e: BaseException) -> str:
    """OmegaConf's multi-line error as one phrase naming the key."""
    lines = str(e).splitlines()
    key = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("full_key:")), "")
    head = lines[0] if lines else type(e).__name__
    if head.startswith("Key '") and "not in" in head:
        return f"{key or head.split(chr(39))[1]} is not a known key (`--cfg job` lists the keys)"
    return f"{key}: {head}" if key else head


def command_groups(command: str) -> list[str]:
    """The config groups a command composes: those its primary config's defaults list names (sample: sampler)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    defaults = OmegaConf.load(files("diffcli.configs").joinpath(f"{command}.yaml")).defaults
    return [next(iter(d)) for d in defaults if isinstance(d, DictConfig)]


def all_groups() -> list[str]:
    """Every config group diffcli ships (the folders of diffcli/configs)."""
    from importlib.resources import files

    return sorted(p.name for p in files("diffcli.configs").iterdir() if p.is_dir() and not p.name.startswith("_"))


def _fields(node: type) -> dict | None:
    """A schema node's fields by name, or None where the schema stops (Any: checked by the class it goes to)."""
    import dataclasses
    import typing

    args = [a for a in typing.get_args(node) if a is not type(None)]
    node = args[0] if typing.get_origin(node) is typing.Union and len(args) == 1 else node  # Optional[X] -> X
    return typing.get_type_hints(node) if dataclasses.is_dataclass(node) else None


def parse_overrides(args: list[str]) -> list:
    """The command line's `key=value` overrides as Hydra parses them; [] on a syntax error (Hydra's own message
    says where, when it runs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except HydraException:
        return []


def override_values(args: list[str]) -> dict:
    """{key or group: value} of the command line's overrides (the last of a repeated key, as Hydra takes it)."""
    return {o.key_or_group: o.value() for o in parse_overrides(args)}


def check_overrides(command: str, args: list[str]) -> None:
    """Refuse, before Hydra runs, a group or key that `command` does not read, with or without Hydra's `+`:
    Hydra's own hint ("use +key") would lead to a run that ignores the key."""
    import difflib

    overrides = parse_overrides(args)
    groups = command_groups(command)
    for o in overrides:
        key = o.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra":
            continue
        if key in all_groups() and key not in groups:
            raise DiffcliError(f"diffcli {command} has no {key}= group{_fixed_by_checkpoint(command)}; its groups: "
                               f"{', '.join(groups)} (`diffcli {command} --help`)")
        fields, path = _fields(SCHEMAS[f"{command}_schema"]), []
        for part in key.split("."):
            if part not in fields:
                known = [".".join([*path, k]) for k in fields]
                close = difflib.get_close_matches(".".join([*path, part]), known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                where = _fixed_by_checkpoint(command) if not path and part in all_groups() else ""
                raise DiffcliError(f"{key} is not a key of diffcli {command}{hint}{where}; "
                                   f"`diffcli {command} --help` lists its groups and keys")
            path.append(part)
            fields = _fields(fields[part])
            if fields is None:
                break


def _fixed_by_checkpoint(command: str) -> str:
    return "" if command == "train" else (": a checkpoint's data, model, net and train settings are fixed when it "
                                          "is trained (diffcli train makes a new one)")


# what a resumed run may change: its training schedule, where it runs, Hydra's own settings
RESUMABLE = ("train.", "hydra.", "hydra/", "device", "logger", "objective")


def resume_overrides(cfg: DictConfig, stored: DictConfig, overrides, run_dir) -> tuple[DictConfig, str | None]:
    """The stored config of a run to resume with this command's `train.*` overrides on top, and the
    user's own net class if this command line names it.

    Any other override (model=, net=, data=, seed, ...) that differs from the stored run is refused:
    the run would silently go on with its old settings. Naming the stored `net._target_` again is
    how a network class of the user's own is accepted (never from the file alone).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    resumed, user_class = OmegaConf.create(OmegaConf.to_container(stored)), None
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    for o in parsed:  # first what a resumed run may change: its schedule and where it runs
        if (o.key_or_group.startswith("train.") and o.key_or_group != "train.resume") or o.key_or_group == "device":
            OmegaConf.update(resumed, o.key_or_group, o.value(), merge=True)
    for o in parsed:
        key = o.key_or_group
        if not key.startswith(RESUMABLE) or key == "train":  # train=<preset>: as long as it is the stored one
            here, there = _plain_at(cfg, key), _plain_at(resumed, key)
            if key == "train":
                here, there = ({k: v for k, v in d.items() if k != "resume"} for d in (here, there))
            if here != there:
                where, there, here = _first_difference(key, there, here)
                culprit = max((p for p in parsed if f"{where}.".startswith(f"{p.key_or_group.lstrip('+~')}.")),
                              key=lambda p: len(p.key_or_group), default=o)  # the most specific override there
                raise DiffcliError(f"train.resume continues {run_dir} as it was trained: {where} there is {there!r}, "
                                   f"here {here!r}; drop {culprit.input_line} or start a new run")
            user_class = o.value() if key == "net._target_" else user_class
    for key in ("logger", "objective"):  # how this attempt is tracked and scored: this command line's choice
        if key in cfg:
            resumed[key] = OmegaConf.to_container(cfg[key], resolve=True)
    return validate(resumed, TrainApp, f"train.resume={run_dir}"), user_class


def _first_difference(key: str, a, b) -> tuple[str, object, object]:
    """The first dotted key below `key` where two plain values differ, and the two values there."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=lambda k: (k != "name", str(k))):  # a group's name says most
            if a.get(k) != b.get(k):
                return _first_difference(f"{key}.{k}", a.get(k), b.get(k))
    return key, a, b


def _plain_at(cfg: DictConfig, key: str):
    """The resolved value at a dotted key (a group's whole node), as plain data for comparing."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key.lstrip("+~"), default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
