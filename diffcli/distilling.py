"""What a distilled run needs beyond an ordinary training run (diffcli distill; docs/guides/distillation.md): the
student's config made from its teacher's, reflow's pairs as its data, and consistency distillation's objective with
its target network. A distilled run's stored config carries a `distill` node, so train.resume continues it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from importlib.resources import files

import torch
from omegaconf import DictConfig, OmegaConf

from . import DiffcliError
from .consistency import DISTANCES, SOLVERS, cd_times, consistency_loss
from .data import located
from .guidance import condition
from .loading import LoadedModel, model_denoiser
from .pairs import PairData, read_pairs
from .paths import FlowPath
from .samplers import is_deterministic
from .schema import TrainApp, validate

METHODS = ("reflow", "consistency")
INITS = ("auto", "teacher", "random")


def check_method(cfg: DictConfig, teacher: LoadedModel) -> None:
    """One line for a method or setting that does not fit the teacher."""
    if cfg.method not in METHODS:
        raise DiffcliError(f"method={cfg.method} is unknown; choose one of {', '.join(METHODS)}")
    if cfg.init not in INITS:
        raise DiffcliError(f"init={cfg.init} is unknown; choose one of {', '.join(INITS)}")
    model = teacher.config.model
    if model.prediction == "consistency":
        raise DiffcliError(f"teacher={teacher.file} is a consistency model, which has no probability-flow ODE to "
                           "distill: give the model it was distilled from")
    if cfg.method == "consistency":
        if not teacher.denoiser.path.gaussian_prior:
            raise DiffcliError(f"method=consistency needs a Gaussian prior (its sampler adds Gaussian noise); the "
                               f"teacher's is {teacher.denoiser.path.prior}: use method=reflow")
        for key, allowed in (("solver", SOLVERS), ("distance", DISTANCES)):
            if cfg.consistency[key] not in allowed:
                raise DiffcliError(f"consistency.{key}={cfg.consistency[key]} is unknown; choose one of "
                                   f"{', '.join(allowed)}")
    if cfg.guidance != 1 and not teacher.n_classes:
        raise DiffcliError(f"guidance={cfg.guidance} distils classifier-free guidance, which needs a class-conditional "
                           "teacher; this one was trained without labels: drop guidance=")


def check_pair_sampler(sampler, name: str) -> None:
    """Reflow's pairs come from the teacher's probability-flow ODE: a sampler that draws noise is refused."""
    if not is_deterministic(sampler.func.__name__, **sampler.keywords):
        raise DiffcliError(f"method=reflow pairs noise with the teacher's ODE endpoint, and sampler {name} draws noise "
                           "of its own: give an ODE sampler, e.g. sampler=heun (or dopri5, dpmpp_2m, ddim with eta=0)")


def _given(node: DictConfig) -> dict:
    """The keys of a distill `train` node set on the command line (null: the teacher's own)."""
    plain = OmegaConf.to_container(node, resolve=True)
    out = {k: v for k, v in plain.items() if v is not None and k != "ema"}
    ema = {k: v for k, v in plain["ema"].items() if v is not None}
    return out | ({"ema": ema} if ema else {})


def student_config(cfg: DictConfig, teacher: LoadedModel, record: dict) -> DictConfig:
    """The student's training config: the teacher's with the distill command's train.* settings, seed and device, its
    model turned into the method's student, and the `distill` record."""
    plain = OmegaConf.to_container(teacher.config, resolve=True)
    given = _given(cfg.train)
    plain["train"] = OmegaConf.to_container(OmegaConf.merge(plain["train"], given)) | {"resume": None}
    plain |= {"seed": cfg.seed, "device": cfg.device, "sampler": None, "steps": None, "eta": 0.0, "distill": record,
              # how the student is tracked and scored is this command's choice: a teacher's stored tracking URI
              # would otherwise send the student's params and checkpoint wherever that file says
              "logger": OmegaConf.to_container(cfg.logger, resolve=True) if "logger" in cfg else {}, "objective": {}}
    if cfg.get("net") is not None:  # the command line's own choice of network
        plain["net"] = OmegaConf.to_container(cfg.net, resolve=True)
    plain["model"] = (reflow_model if cfg.method == "reflow" else consistency_model)(plain["model"], cfg, teacher)
    if cfg.method == "consistency":  # it reads the teacher's real data, from where this command says
        plain["data"] = OmegaConf.to_container(located(teacher.config.data, cfg.data, teacher.kind), resolve=True)
    return validate(plain, TrainApp, "diffcli distill")


def reflow_model(model: dict, cfg: DictConfig, teacher: LoadedModel) -> dict:
    """A flow from the teacher's prior (its unit noise x1) to its samples: the teacher's own model when it is a flow
    predicting velocity, else the shipped model=flow; Euler on `sample_steps` equal steps by default."""
    if not (isinstance(teacher.denoiser.path, FlowPath) and model["prediction"] == "velocity"):
        flow = OmegaConf.to_container(OmegaConf.load(files("diffcli.configs").joinpath("model", "flow.yaml")),
                                      resolve=True)
        model = {**flow, **{k: model[k] for k in ("cond", "n_classes", "class_names") if k in model}}
    grid = {"name": "linear"}
    return {**model, "sampler": "euler", "sampler_options": {"grid": grid, "default_steps": cfg.sample_steps}}


def consistency_model(model: dict, cfg: DictConfig, teacher: LoadedModel) -> dict:
    """The teacher's model with the consistency prediction (boundary f(x, s_min) = x~, Song et al. 2023, eq. 3 and
    appendix C) and multistep consistency sampling from the largest level t_N down to 0 by default."""
    times, s_min = cd_times(teacher.denoiser.path, cfg.consistency.N)
    grid = {"name": "linear", "t_max": float(times[-1])}
    return {**model, "prediction": "consistency", "sigma_min": s_min, "sampler": "consistency",
            "sampler_options": {"grid": grid, "default_steps": cfg.sample_steps}}


def teacher_record(cfg: DictConfig, teacher: LoadedModel, sampler: str = "", nfe: int | None = None) -> dict:
    """The `distill` node stored with the student."""
    record = {"method": cfg.method, "teacher": str(Path(teacher.file).resolve()), "teacher_step": teacher.step, "sampler": sampler,
              "nfe": nfe, "guidance": float(cfg.guidance)}
    if cfg.method == "consistency":
        record |= {k: cfg.consistency[k] for k in ("N", "mu", "solver", "distance")}
    return record


def pair_data(cfg: DictConfig, device) -> PairData:
    """Reflow's pairs (cfg.distill.pairs, the first n_pairs) as the student's training set."""
    d = cfg.distill
    x0, x1, labels, _ = read_pairs(d.pairs, d.n_pairs)
    return PairData(x0, x1, labels, device=device, seed=cfg.seed, class_names=cfg.model.get("class_names"))


class ConsistencyObjective:
    """Consistency distillation's loss for the training loop (Song et al. 2023, Alg. 2): level indices n drawn per
    example, the teacher's ODE step between t_{n+1} and t_n, and a target network that follows the student as an EMA
    of decay mu (theta^- <- mu theta^- + (1 - mu) theta)."""

    def __init__(self, cfg: DictConfig, net: torch.nn.Module, path, teacher: LoadedModel):
        d, model = cfg.distill, cfg.model
        self.path, self.model_cfg, self.d = path, model, d
        self.times, _ = cd_times(teacher.denoiser.path, d.N)
        self.teacher = teacher.denoiser.requires_grad_(False)
        self.target_net = copy.deepcopy(net).requires_grad_(False)

    def draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        """n level indices uniform in {0, ..., N - 2} (Alg. 2)."""
        return torch.randint(0, len(self.times) - 1, (n,), generator=g, device=g.device)

    def __call__(self, model, x0, x1, n, y):
        student = model_denoiser(model, self.path, self.model_cfg)
        target = model_denoiser(self.target_net, self.path, self.model_cfg)
        teacher = condition(self.teacher, None, guidance=self.d.guidance) if self.d.guidance != 1 else self.teacher
        return consistency_loss(student, target, teacher, self.path, x0, x1, n.to(x0.device),
                                self.times.to(x0.device, x0.dtype), self.d.solver, self.d.distance, y)

    @torch.no_grad()
    def after_step(self, net: torch.nn.Module) -> None:
        for p_target, p in zip(self.target_net.parameters(), net.parameters()):
            p_target.lerp_(p.detach(), 1 - self.d.mu)


def student_init(cfg: DictConfig, teacher: LoadedModel, student: DictConfig) -> dict | None:
    """The teacher's weights as the student's first ones (init=teacher, or auto with the teacher's network), else
    None (a fresh initialisation)."""
    same = OmegaConf.to_container(student.net, resolve=True) == OmegaConf.to_container(teacher.config.net, resolve=True)
    trainable = any(p.requires_grad for p in teacher.denoiser.net.parameters())
    if cfg.init == "random" or (cfg.init == "auto" and not (same and trainable)):
        return None
    if not same:
        raise DiffcliError("init=teacher needs the teacher's network, and net= names another: use init=random or "
                           "drop net=")
    return {k: v.detach().clone() for k, v in teacher.denoiser.net.state_dict().items()}

