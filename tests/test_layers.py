"""The application layer's shape (docs/design.md, "Module map"): commands never import each other, the maths layer
imports nothing from configs, commands or the application layer, and what crosses a boundary is a value."""

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffcli"
COMMANDS = {"train", "sample", "evaluate", "summary", "edit", "convert", "distill"}
APPLICATION = {"loading", "sampling", "scoring", "training", "plots", "runs", "schema", "build", "checkpoint", "help",
               "distributed", "allocator", "cli", "inputs", "diffusers_format", "fitting", "distilling", "pairs",
               "loggers", "ranges"}
MATHS = {"paths", "prediction", "guidance", "losses", "nets", "oracle", "likelihood", "metrics", "samplers", "editing",
         "toys", "diffusers_net", "diffusers_map", "consistency"}


def imported_modules(file: Path) -> set[str]:
    """The diffcli modules a file imports (relative or absolute, at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (node.module or "").removeprefix("diffcli.").removeprefix("diffcli")
            if node.level == 0 and not (node.module or "").startswith("diffcli"):
                continue
            if base:
                found.add(base.split(".")[0])
            else:  # from . import x, y
                found |= {alias.name for alias in node.names}
    return found


def module_file(name: str) -> list[Path]:
    return sorted((PACKAGE / name).glob("*.py")) if (PACKAGE / name).is_dir() else [PACKAGE / f"{name}.py"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_never_import_each_other(command):
    assert not imported_modules(PACKAGE / f"{command}.py") & (COMMANDS - {command})


@pytest.mark.parametrize("module", sorted(MATHS))
def test_the_maths_layer_imports_no_command_or_application_module(module):
    for file in module_file(module):
        assert not imported_modules(file) & (COMMANDS | APPLICATION), file


def test_values_cross_the_boundaries():
    """LoadedModel and SampleResult are frozen values, not dicts or tuples."""
    from diffcli.loading import LoadedModel
    from diffcli.sampling import SampleResult

    for value in (LoadedModel, SampleResult):
        assert dataclasses.is_dataclass(value) and value.__dataclass_params__.frozen


def test_the_denoiser_holds_no_conditions():
    """Conditions are values given when a denoiser is built: the bare Denoiser has no attribute to set them on."""
    import torch

    from diffcli.paths import VPPath
    from diffcli.prediction import Denoiser

    d = Denoiser(torch.nn.Linear(2, 2), VPPath(), "eps")
    for name in ("labels", "guidance", "guidance_interval", "guide", "classifier", "classifier_scale", "nfe"):
        assert not hasattr(d, name), name
