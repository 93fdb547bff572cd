"""`diffcli train|sample|eval [overrides] [-m]`: pops the subcommand, runs that command's Hydra app.

Errors a user can fix (bad overrides, bad paths, bad values) are printed as one line and exit
with code 2; set HYDRA_FULL_ERROR=1 to see the full traceback instead.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from . import DiffcliError, __version__

CONFIGS = "pkg://diffcli.configs"
USAGE = f"""diffcli {__version__}: train, sample and evaluate diffusion and flow-matching models

usage: diffcli <command> [key=value ...] [group=option ...] [-m] [--cfg job] [--help]

commands:
  train    fit a model          e.g. diffcli train data=moons
  sample   sample a checkpoint  e.g. diffcli sample sampler=ddim steps=50 eta=0
  eval     score a checkpoint   e.g. diffcli eval ckpt=outputs/train/<run>

'diffcli <command> --help' lists that command's config groups and options.
"""


def _run_dir() -> str:
    return hydra.core.hydra_config.HydraConfig.get().runtime.output_dir


def _overrides() -> list[str]:
    return list(hydra.core.hydra_config.HydraConfig.get().overrides.task)


@hydra.main(version_base=None, config_path=CONFIGS, config_name="train")
def train_app(cfg: DictConfig) -> None:
    from .train import run_train

    run_train(cfg, _run_dir(), overrides=_overrides())


@hydra.main(version_base=None, config_path=CONFIGS, config_name="sample")
def sample_app(cfg: DictConfig) -> None:
    from .sample import run_sample

    run_sample(cfg, _run_dir())


@hydra.main(version_base=None, config_path=CONFIGS, config_name="eval")
def eval_app(cfg: DictConfig) -> None:
    from .evaluate import run_eval

    run_eval(cfg, _run_dir())


COMMANDS = {"train": train_app, "sample": sample_app, "eval": eval_app}


def _one_line(e: BaseException) -> str:
    """Hydra's multi-line messages ('Could not find ...\\n\\nAvailable options: ...') on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines).replace("Available options in", "; available options in")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    if argv[0] in ("-V", "--version"):
        print(f"diffcli {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(_fail(f"unknown command '{command}'; valid commands: {', '.join(COMMANDS)}"))
    user_wants_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's multi-line report
    sys.argv = [f"diffcli {command}", *rest]
    try:
        COMMANDS[command]()
    except Exception as e:
        cause = _user_error(e)
        if user_wants_trace or cause is None:
            raise
        sys.exit(_fail(cause))


def _user_error(e: BaseException) -> str | None:
    """The one-line message of a user error anywhere in the exception chain (Hydra wraps ours)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    chain = [e]
    while len(chain) < 20 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for link in chain:
        if isinstance(link, DiffcliError):
            return str(link)
    return _one_line(e) if isinstance(e, (HydraException, OmegaConfBaseException)) else None


def _fail(message: str) -> int:
    print(f"diffcli: error: {message}", file=sys.stderr)
    return 2
