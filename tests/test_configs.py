"""Every primary config composes with every option of every group; defaults are the sensible ones."""

from importlib.resources import files

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config
from diffcli.sampling import sampler_config, sampler_from_config
from diffcli.samplers.core import check_clip

CONFIGS = files("diffcli.configs")
GROUPS = {g: sorted(p.name[:-5] for p in CONFIGS.joinpath(g).iterdir() if p.name.endswith(".yaml"))
          for g in ("data", "model", "net", "sampler", "train")}
PRIMARY_GROUPS = {"train": ["data", "model", "net", "sampler", "train"], "sample": ["sampler"], "eval": ["sampler"]}
CASES = [(primary, group, option) for primary, groups in PRIMARY_GROUPS.items() for group in groups
         for option in GROUPS[group]]


def test_groups_are_not_empty():
    assert all(GROUPS.values()) and {"moons", "eight_gaussians", "mnist", "cifar10", "npz"} <= set(GROUPS["data"])


@pytest.mark.parametrize("primary, group, option", CASES, ids=[f"{p}-{g}={o}" for p, g, o in CASES])
def test_every_option_composes(primary, group, option):
    cfg = compose_config(primary, [f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "sampler":  # the sampler and its grid build (for DDPM, or a flow where only that is valid)
        from diffcli.samplers import NEEDS

        model = "flow" if "flow path" in NEEDS[option] else "ddpm"
        fn, grid = sampler_from_config(cfg.sampler, instantiate(compose_config("train", [f"model={model}"]).model.path))
        assert callable(fn) and 0.9 < grid[0] <= 1 and grid[-1] >= 0 and (grid.diff() < 0).all()


@pytest.mark.parametrize("data, net", [("moons", "MLP"), ("eight_gaussians", "MLP"), ("mnist", "UNet"),
                                       ("cifar10", "UNet"), ("npz", "UNet")])
def test_dataset_brings_its_network(data, net):
    cfg = compose_config("train", [f"data={data}"])
    assert cfg.net._target_ == f"diffcli.nets.{net}"
    assert compose_config("train", [f"data={data}", "net=mlp"]).net._target_ == "diffcli.nets.MLP"


def test_cifar10_default_is_the_ddpm_network_and_toys_the_toy_preset():
    assert compose_config("train", ["data=cifar10"]).net.ch == 128
    assert compose_config("train", ["data=moons"]).train.batch_size == 512
    assert compose_config("train", ["data=moons", "train=default"]).train.batch_size == 128


def test_the_quick_preset_brings_the_formulation_it_was_tuned_with():
    """train=quick was tuned with model=flow (docs/benchmarks.md); model= on the command line still wins."""
    assert compose_config("train", ["data=mnist", "train=quick"]).model.name == "flow"
    assert compose_config("train", ["data=mnist", "train=quick", "model=ddpm"]).model.name == "ddpm"
    assert compose_config("train", ["data=mnist"]).model.name == "ddpm"


def test_top_level_sampling_keys_reach_the_sampler():
    cfg = compose_config("sample", ["sampler=ddim", "steps=7", "eta=0.5"])
    fn, grid = sampler_from_config(cfg.sampler, instantiate(compose_config("train").model.path))
    assert len(grid) == 8 and fn.keywords["eta"] == 0.5


@pytest.mark.parametrize("model", GROUPS["model"])
def test_models_build_with_their_default_sampler(model):
    cfg = compose_config("train", [f"model={model}"])
    path = instantiate(cfg.model.path)
    assert torch.isclose(path.alpha(torch.tensor(0.0)), torch.tensor(1.0))
    fn, grid = sampler_from_config(sampler_config(cfg, cfg.model), path)
    assert fn.func.__name__ == cfg.model.sampler and grid[0] == 1


def test_sigma_max_comes_from_the_dataset():
    assert compose_config("train", ["model=vesde", "data=cifar10"]).model.path.sigma_max == 99.6
    assert compose_config("train", ["model=ncsn", "data=moons"]).model.path.sigma_max == 6.6


def test_readme_sampler_table_is_the_generated_one():
    """The README's validity table is exactly what scripts/sampler_table.py derives from the code."""
    import runpy

    from conftest import ROOT

    table = runpy.run_path(str(ROOT / "scripts" / "sampler_table.py"))["table"]()
    assert table in (ROOT / "docs" / "guides" / "sampling.md").read_text()


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_clip_x0_auto_clips_images_only(sampler):
    """clip_x0=auto: pixels live in [-1, 1], so x0_hat is clamped for images; 2D points are never clamped."""
    path = instantiate(compose_config("train").model.path)
    cfg = compose_config("sample", [f"sampler={sampler}"])
    assert sampler_from_config(cfg.sampler, path, is_image=True)[0].keywords["clip_x0"] == "static"
    assert sampler_from_config(cfg.sampler, path, is_image=False)[0].keywords["clip_x0"] == "none"
    for value in ("false", "none"):
        off = compose_config("sample", [f"sampler={sampler}", f"sampler.fn.clip_x0={value}"])
        assert check_clip(sampler_from_config(off.sampler, path, is_image=True)[0].keywords["clip_x0"]) == "none"
