"""Per-command help lists exactly what the command reads; the README's lists of options match the configs."""

import functools
import re
import runpy

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import ROOT, compose_config, run_cli
from diffcli.help import GROUPS, command_groups

CONFIGS = ROOT / "configs"
OPTIONS = {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in CONFIGS.iterdir() if d.is_dir()}
README = "\n".join((ROOT / "docs" / page).read_text() for page in (  # the docs pages that carry the tables
    "reference/configs.md", "guides/sampling.md", "formulations.md", "guides/evaluation.md"))
ABSENT = object()


def _composes(command, group, option) -> bool:
    try:
        compose_config(command, [f"{group}={option}"])
        return True
    except Exception:  # Hydra: no such group in this command's defaults list
        return False


def _parse_help(text):
    """(groups -> options, keys -> default text) from `diffcli <command> --help`."""
    groups = dict(re.findall(r"^  (\w+)=  (.+)$", text, re.M))
    keys = dict(re.findall(r"^  ([\w.]+)=(\S+) ", text, re.M))
    return {g: o.split(", ") for g, o in groups.items()}, keys


def _leaves(cfg, groups, prefix=""):
    """The keys of a composed config outside its groups, dotted below plain nodes."""
    out = {}
    for key in cfg:
        if not prefix and key in groups:
            continue
        node = cfg._get_node(key)
        out |= _leaves(node, groups, f"{prefix}{key}.") if isinstance(node, DictConfig) else {f"{prefix}{key}": node}
    return out


@pytest.mark.parametrize("command", ["train", "sample", "eval"])
def test_help_lists_exactly_the_groups_and_keys_the_command_reads(tmp_path, command):
    r = run_cli(command, "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"diffcli {command}: "), r.stderr
    groups, keys = _parse_help(r.stdout)
    for group, options in OPTIONS.items():  # a group is listed iff Hydra composes it for this command
        assert (group in groups) == _composes(command, group, options[0]), group
        if group in groups:
            assert groups[group] == options
    composed = _leaves(compose_config(command), set(command_groups(command)))
    assert set(keys) == set(composed)
    assert not (tmp_path / "outputs").exists()


def test_sample_help_lists_none_of_the_training_groups(tmp_path):
    groups, _ = _parse_help(run_cli("sample", "--help", cwd=tmp_path).stdout)
    assert set(groups) == {"sampler"}


@functools.cache
def _composed(command, group, option):
    return compose_config(command, [f"{group}={option}"])


def test_every_described_key_exists():
    """The main keys described for each group are keys of at least one option of it (no stale help)."""
    for group, (_, keys) in GROUPS.items():
        command = next(c for c in ("train", "eval") if group in command_groups(c))
        for key in keys:
            if key.endswith(".*"):
                key = key[:-2]
            dotted = key if key == group or key.startswith(f"{group}.") else f"{group}.{key}"
            found = [OmegaConf.select(_composed(command, group, o), dotted, default=ABSENT) for o in OPTIONS[group]]
            assert any(v is not ABSENT for v in found), dotted


def test_readme_config_tables_are_the_generated_ones():
    """The README's group and key tables are exactly what scripts/config_tables.py derives from the configs."""
    assert runpy.run_path(str(ROOT / "scripts" / "config_tables.py"))["tables"]() in README


def _table_names(header: str) -> list[str]:
    """The backticked names in the first column of the README table under `header`."""
    block = README.split(header, 1)[1].split("\n\n", 1)[0]
    return sorted(n for line in block.splitlines()[1:] if line.startswith("| ")
                  for n in re.findall(r"`(\w+)`", line.split(" | ")[0]))


def test_readme_lists_every_option_of_every_group():
    assert _table_names("| `sampler=` | what | default steps (grid) |") == OPTIONS["sampler"]
    assert _table_names("| `model=` | path | training | default sampler |") == OPTIONS["model"]
    listed = re.search(r"The config group `metric/` \(([^)]*)\)", README).group(1)
    assert sorted(re.findall(r"`(\w+)`", listed)) == OPTIONS["metric"]
