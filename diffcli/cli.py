"""`diffcli train|sample|eval|edit|distill [overrides] [-m]`: pops the subcommand, runs that command's Hydra app.

Errors a user can fix (bad overrides, bad paths, bad values) are printed as one line and exit
with code 2; set HYDRA_FULL_ERROR=1 to see the full traceback instead.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys

from . import DiffcliError, __version__

# a full disk, a read-only or forbidden folder, a file-size limit, a path through a file
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR}

CONFIGS = "pkg://diffcli.configs"
USAGE = f"""diffcli {__version__}: train, sample and evaluate diffusion and flow-matching models

usage: diffcli <command> [key=value ...] [group=option ...] [-m] [--cfg job] [--help]

commands:
  train    fit a model          e.g. diffcli train data=moons
  sample   sample a checkpoint  e.g. diffcli sample sampler=ddim steps=50 eta=0
  eval     score a checkpoint   e.g. diffcli eval ckpt=outputs/train/<run> metric=fid
  edit     edit with a model    e.g. diffcli edit task=inpaint input=digits.npz mask=bottom
  distill  a few-step student  e.g. diffcli distill teacher=outputs/train/<run> method=reflow
  summary  tabulate a sweep     e.g. diffcli summary outputs/multirun/eval/<date>_<time>
  import   from diffusers       e.g. diffcli import ddpm-mnist/ out=outputs/import/ddpm-mnist
  export   to diffusers         e.g. diffcli export outputs/train/<run> ddpm-mnist/

'diffcli <command> --help' lists that command's config groups and options.
"""


def _user_errors_exit(task):
    """Inside a Hydra job: a user error ends the process with one line and exit code 2.

    Exiting from inside the job (SystemExit passes through Hydra) keeps Hydra from adding its
    own 'Error executing job' report around our message.
    """

    def job(cfg) -> None:
        from .runs import CREATED

        if _multirun():  # a sweep's job folder is made for this job alone (the sweep's folder is new): a failed
            CREATED.setdefault(os.path.abspath(_run_dir()), [])  # job leaves none behind either
        try:
            return task(cfg)  # train's objective: the value Hydra's sweeper (hydra/sweeper=optuna) optimizes
        except KeyboardInterrupt as e:
            _remove_unused()
            sys.exit(_fail(*(("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else
                             ("interrupted (Ctrl-C)", 130))))
        except Exception as e:
            _remove_unused()
            message = _user_error(e)
            if message is None or os.environ.get("DIFFCLI_TRACEBACK") == "1":
                raise
            sys.exit(_fail(message))

    return job


def _remove_unused() -> None:
    """The folder of a job that failed before doing any work, and its sweep's if no job did any."""
    from hydra.core.hydra_config import HydraConfig

    from .runs import remove_if_unused

    remove_if_unused(_run_dir())
    if _multirun():
        remove_if_unused(HydraConfig.get().sweep.dir)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training's loop (which stops between steps itself): unwinds like Ctrl-C, so that a command
    cleans up (no partial samples.npz, no folder of a run that did nothing) and says why it stopped."""


def _terminate(signum, frame):
    raise Terminated()


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _check_given_folder(key: str, folder: str) -> None:
    """A folder named on the command line for a new run must not hold anything yet: writing into a finished run
    would replace its checkpoints, logs or .hydra/config.yaml (train.resume is how a run continues)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DiffcliError(f"{key}={folder} is a file; give a folder that does not exist yet")
    if os.path.isdir(folder) and any(os.scandir(folder)):
        raise DiffcliError(f"{key}={folder} already holds files (a run?) and a new run never writes into another's "
                           "folder: give a new one, or continue a training run with train.resume=<its folder>")


def _run_folder_overrides(command: str, rest: list[str]) -> list[str]:
    """Hydra overrides that put a run's folder where it belongs.

    `train.resume` continues a run in that run's own folder: Hydra's log is appended to its train.log and no
    second folder (nor a second .hydra/) is made. A new hydra.run.dir is noted as this run's own, to remove if the
    run fails before doing any work.
    """
    from .runs import CREATED, missing_folders
    from .schema import override_values

    values = override_values(rest)
    given, sweep, resume = (values.get(k) for k in ("hydra.run.dir", "hydra.sweep.dir", "train.resume"))
    multirun = bool({"-m", "--multirun"} & set(rest))
    for key, folder in (("hydra.sweep.dir", sweep if multirun else None), ("hydra.run.dir", None if multirun else given)):
        if isinstance(folder, str):
            _check_given_folder(key, folder)
    for folder in (given, sweep):
        if isinstance(folder, str) and not os.path.exists(folder):
            CREATED[os.path.abspath(folder)] = missing_folders(folder)[1:]
    if command != "train" or not isinstance(resume, str) or multirun:
        return []
    if given is not None:
        raise DiffcliError(f"train.resume={resume} continues that run in its own folder; drop hydra.run.dir={given}")
    from .checkpoint import newest_state

    run_dir, _ = newest_state(resume)
    # Hydra's quoted strings unescape only backslashes before a quote or at the end: double those, escape quotes
    quoted = re.sub(r"\\+(?='|$)", lambda m: m.group(0) * 2, str(run_dir)).replace("'", "\\'")
    return [f"hydra.run.dir='{quoted}'", "hydra.output_subdir=null"]


# a Hydra sweeper diffcli knows -> (the modules it needs, the extra that installs them)
SWEEPERS = {"optuna": (("optuna", "hydra_plugins.hydra_optuna_sweeper"), "optuna")}


def _sweeper_overrides(rest: list[str]) -> list[str]:
    """hydra/sweeper=optuna: refused in one line when its plugin is missing; its study's direction follows
    objective.direction (auto: the metric's own) unless the command line sets hydra.sweeper.direction."""
    from .loggers import installed
    from .schema import override_values

    values = override_values(rest)
    name = values.get("hydra/sweeper")
    if name not in SWEEPERS:
        return []
    modules, extra = SWEEPERS[name]
    if not all(installed(m) for m in modules):
        raise DiffcliError(f"hydra/sweeper={name} needs Hydra's {name} sweeper, which is not installed: "
                           f"pip install 'diffcli[{extra}]'")
    _check_objective(values.get("objective.metric"), values.get("objective.direction", "auto"),
                     values.get("hydra.sweeper.direction"))
    if "hydra.sweeper.direction" in values:
        return []
    return ["hydra.sweeper.direction='${diffcli.direction:${objective.metric},${objective.direction}}'"]


def _check_objective(metric, direction, study) -> None:
    """An Optuna study needs objective.metric, and optimizes it in its own direction (`study`, if set)."""
    from .ranges import OBJECTIVES, objective_direction

    if metric is None:
        raise DiffcliError("hydra/sweeper=optuna tunes a value each run returns: set objective.metric, e.g. "
                           "objective.metric=sliced_wasserstein (2D) or objective.metric=cfid (labelled images)")
    ours = objective_direction(metric, direction)
    if metric in OBJECTIVES and study is not None and study != ours:
        raise DiffcliError(f"hydra.sweeper.direction={study} but objective.metric={metric} is to {ours}: drop "
                           "hydra.sweeper.direction (it follows objective.direction) or set both alike")


def preflight(command: str, cfg) -> None:
    """What can be refused on text alone, before torch is imported (a second instead of four): the
    config's keys, types and ranges, and for sample/eval the checkpoint's metadata and the classes its
    stored config names. run_* checks all of it again when it builds."""
    from .build import check_names
    from .checkpoint import find_ema, newest_state, read_metadata, stored_config
    from .diffusers_format import folder_config, is_folder
    from .ranges import check_distill_ranges, check_ranges
    from .schema import SCHEMAS, resume_overrides, validate

    from .loggers import check_installed

    cfg = validate(cfg, SCHEMAS[f"{command}_schema"], f"diffcli {command}")
    (check_distill_ranges if command == "distill" else check_ranges)(cfg)
    check_installed(cfg.get("logger"))
    if command == "train" and not cfg.train.get("resume"):
        check_names(cfg, user_class=cfg.net.get("_target_"))  # the command line's own choice
        return
    if command == "train":  # train.resume: the stored run's config, with this command line's changes
        run_dir, file = newest_state(cfg.train.resume)
        stored = stored_config(read_metadata(file), file)
        check_names(*resume_overrides(cfg, stored, _overrides(), run_dir))
        return
    ckpt = cfg.teacher if command == "distill" else cfg.ckpt
    if command == "distill" and ckpt is None:
        raise DiffcliError("diffcli distill needs teacher=<a training run, an ema_<step>.safetensors or a diffusers "
                           "folder>")
    if is_folder(ckpt):  # a diffusers folder: its JSON mapped onto a diffcli config, no weights read yet
        file, stored = ckpt, folder_config(ckpt)[0]
    else:
        file = find_ema(ckpt)
        stored = stored_config(read_metadata(file), file)  # its errors name the file already
    try:
        check_names(stored, cfg.get("net_class"))
    except DiffcliError as e:
        raise DiffcliError(f"{file}: {e}") from None


@_user_errors_exit
def _train(cfg) -> float | None:
    preflight("train", cfg)
    from .train import run_train

    return run_train(cfg, _run_dir(), overrides=_overrides(), sweep=_sweep()).get("objective")


@_user_errors_exit
def _sample(cfg) -> None:
    preflight("sample", cfg)
    from .sample import run_sample

    run_sample(cfg, _run_dir())


@_user_errors_exit
def _eval(cfg) -> None:
    preflight("eval", cfg)
    from .evaluate import run_eval

    run_eval(cfg, _run_dir(), overrides=_overrides(), sweep=_sweep())


@_user_errors_exit
def _edit(cfg) -> None:
    preflight("edit", cfg)
    from .edit import run_edit

    run_edit(cfg, _run_dir())


@_user_errors_exit
def _distill(cfg) -> None:
    preflight("distill", cfg)
    from .distill import run_distill

    run_distill(cfg, _run_dir(), overrides=_overrides(), sweep=_sweep())


# subcommand -> (primary config, task function); Hydra is imported only once one is chosen
COMMANDS = {"train": ("train", _train), "sample": ("sample", _sample), "eval": ("eval", _eval), "edit": ("edit", _edit),
            "distill": ("distill", _distill)}


def _run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def _sweep():
    """A multirun job's sweep: its folder and the keys its command line varies (model=ddpm,flow;
    train.lr=interval(...)), which name its jobs to the trackers; None for a single run."""
    from hydra.core.hydra_config import HydraConfig

    from .loggers import Sweep
    from .schema import parse_overrides

    if not _multirun():
        return None
    varies = tuple(o.key_or_group for o in parse_overrides(sys.argv[1:]) if o.is_sweep_override())
    return Sweep(str(HydraConfig.get().sweep.dir), varies)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _hydra_app(command: str):
    """The @hydra.main app of a subcommand: its own primary config, Hydra's flags untouched."""
    import hydra

    config_name, task = COMMANDS[command]
    return hydra.main(version_base=None, config_path=CONFIGS, config_name=config_name)(task)


def _one_line(e: BaseException) -> str:
    """Hydra's multi-line messages ('Could not find ...\\n\\nAvailable options: ...') on one line."""
    text = str(e).split("Config search path")[0]  # Hydra appends its search path: noise to a user
    head, _, options = text.partition("Available options in")
    message = " ".join(head.split())
    if options:
        group, _, names = options.partition(":")
        message += f"; available options in {group.strip()}: {', '.join(names.split())}"
    if "override 'sampler." in message:  # the sampler group defaults to null (the model's own sampler)
        message = message.split(". To append")[0] + ": choose the sampler too, e.g. sampler=langevin sampler.fn.n_steps=50"
    return message


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    if argv[0] in ("-V", "--version"):
        print(f"diffcli {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command in PLAIN_COMMANDS:
        sys.exit(PLAIN_COMMANDS[command](rest))
    if command not in COMMANDS:
        sys.exit(_fail(f"unknown command '{command}'; valid commands: {', '.join([*COMMANDS, *PLAIN_COMMANDS])}"))
    if "--help" in rest or "-h" in rest:  # Hydra's own help would list every group, also those this command refuses
        from .help import command_help

        print(command_help(command), end="")
        return
    try:
        from .schema import check_overrides

        check_overrides(command, rest)
        rest = [*rest, *_sweeper_overrides(rest)]
        if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks write no folder of their own (below)
            rest = [*rest, *_run_folder_overrides(command, rest)]
    except DiffcliError as e:
        sys.exit(_fail(str(e)))
    user_wants_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["DIFFCLI_TRACEBACK"] = "1" if user_wants_trace else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's multi-line report
    if command in COMMANDS and os.environ.get("RANK", "0") != "0":
        # torchrun's other ranks: rank 0 owns the run folder and its logs, these write nothing of their own
        rest = [*rest, "hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout"]
    sys.argv = [f"diffcli {command}", *rest]
    from .allocator import keep_freed_memory

    keep_freed_memory()  # CPU steps no longer fault their activations in from the kernel each time
    _quiet_warnings()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _hydra_app(command)()
    except KeyboardInterrupt as e:
        sys.exit(_fail(*(("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted (Ctrl-C)", 130))))
    except Exception as e:
        cause = _user_error(e)
        if user_wants_trace or cause is None:
            raise
        sys.exit(_fail(cause))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summary(args: list[str]) -> int:
    """`diffcli summary DIR`: no Hydra, just the metrics.json files under DIR."""
    usage = ("usage: diffcli summary DIR (an eval or training run or sweep folder, "
             "e.g. outputs/multirun/eval/<date>_<time>)")
    if "-h" in args or "--help" in args:
        print(usage)
        return 0
    if len(args) != 1 or args[0].startswith("-"):  # a mistake: one line on stderr, like every other one
        got = "no folder" if not args else f"'{args[0]}'" if len(args) == 1 else f"{len(args)} arguments"
        return _fail(f"diffcli summary takes one folder, got {got}; {usage}")
    from .summary import summarize

    try:
        out = summarize(args[0])
    except DiffcliError as e:
        return _fail(str(e))
    except OSError as e:  # a folder that went away or became unreadable while it was read
        return _fail(f"cannot read {e.filename or args[0]} ({e.strerror or e}); check the folder's permissions")
    print(f"wrote {out['csv']}" + (f" and {out['plot']}" if "plot" in out else ""))
    return 0


IMPORT_USAGE = ("usage: diffcli import FOLDER [out=DIR] [null_class=K] [data=mnist|fashion_mnist|cifar10] (a diffusers "
                "pipeline folder: model_index.json, unet/, scheduler/)")
EXPORT_USAGE = "usage: diffcli export CKPT FOLDER (a diffcli run or ema_<step>.safetensors of model=ddpm; a new folder)"


def _plain_arguments(args: list[str], usage: str, positional: int, keys: tuple) -> tuple[list, dict] | int:
    """(positional arguments, key=value options) of a command without Hydra, or the exit code of a one-line error."""
    if "-h" in args or "--help" in args:
        print(usage)
        return 0
    given = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = next((k for k in options if k not in keys), None)
    if len(given) != positional or unknown is not None:
        what = f"the option {unknown}=" if unknown else f"{len(given)} arguments where {positional} belong"
        return _fail(f"{what}; {usage}")
    return given, options


def _import(args: list[str]) -> int:
    """`diffcli import FOLDER [out=DIR] [null_class=K] [data=NAME]`: a diffusers folder as a diffcli checkpoint."""
    parsed = _plain_arguments(args, IMPORT_USAGE, 1, ("out", "null_class", "data"))
    if isinstance(parsed, int):
        return parsed
    (folder,), options = parsed
    null = options.get("null_class")
    if null is not None and not null.isdigit():
        return _fail(f"null_class={null} must be a class index (the embedding row of 'no label'); {IMPORT_USAGE}")
    return _convert(lambda c: c.run_import(folder, options.get("out"), None if null is None else int(null),
                                           options.get("data")), "wrote {} (use it as ckpt=)")


def _export(args: list[str]) -> int:
    """`diffcli export CKPT FOLDER`: a diffcli DDPM model as a DDPMPipeline / DDIMPipeline folder."""
    parsed = _plain_arguments(args, EXPORT_USAGE, 2, ())
    if isinstance(parsed, int):
        return parsed
    (ckpt, folder), _ = parsed
    return _convert(lambda c: c.run_export(ckpt, folder), "wrote {} (DDPMPipeline / DDIMPipeline.from_pretrained)")


def _convert(task, done: str) -> int:
    from . import convert

    try:
        print(done.format(task(convert)))
    except DiffcliError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C)", 130)
    return 0


# commands without Hydra: positional arguments and key=value options of their own
PLAIN_COMMANDS = {"summary": _summary, "import": _import, "export": _export}


def _user_error(e: BaseException) -> str | None:
    """The one-line message of a user error anywhere in the exception chain (Hydra wraps ours)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .schema import config_error

    chain = [e]
    while len(chain) < 20 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for link in chain:
        if isinstance(link, DiffcliError):
            return str(link)
    for link in chain:
        if isinstance(link, OSError) and link.errno in DISK_ERRNOS:  # Hydra's own run folder and log file too
            where = link.filename or "the output folder"
            return (f"cannot write {where} ({link.strerror}); free space or give a writable folder "
                    "(hydra.run.dir=...)")
    if isinstance(e, (HydraException, OmegaConfBaseException)) or _raised_by_hydra(e):
        message = _one_line(e)
        cause = next((c for c in chain[1:] if isinstance(c, OmegaConfBaseException)), None)
        if cause is not None and "raised while composing" in message:  # Hydra's wording around OmegaConf's error
            message = f"{message.split(':')[0]}: {config_error(cause)}"
        elif cause is not None and message.startswith("Error"):  # 'Error merging override x=y' does not say what
            message = f"{message}: {config_error(cause)}"
        return message
    return None


def _raised_by_hydra(e: BaseException) -> bool:
    """A ValueError from Hydra's own argument checks (e.g. `-m` together with `--cfg`)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return isinstance(e, ValueError) and bool(frames) and "/hydra/" in frames[-1].filename


MAX_MESSAGE = 1000  # characters of an error line: a value from a file is never echoed whole


def _fail(message: str, code: int = 2) -> int:
    message = " ".join(message.split())
    if len(message) > MAX_MESSAGE:  # keep the head (what is wrong) and the tail (how to fix it)
        message = f"{message[:MAX_MESSAGE * 2 // 3]} [...] {message[-MAX_MESSAGE // 3:]}"
    print(f"diffcli: error: {message}", file=sys.stderr)
    return code


def _quiet_warnings() -> None:
    """Python warnings of the libraries go to the run's log (Hydra's console is stdout), never as extra stderr lines
    around diffcli's one-line errors."""
    import logging

    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(logging.NullHandler())  # before Hydra's logging: dropped, not
    # printed by logging's last-resort stderr handler
