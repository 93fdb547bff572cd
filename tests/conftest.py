"""Shared helpers: config composition through Hydra's API, the real console script, shared data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DIFFCLI = Path(sys.executable).with_name("diffcli")  # the installed console script


def compose_config(name: str, overrides=()):
    """A primary config composed exactly as the CLI would, without running Hydra's app."""
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        return compose(name, overrides=list(overrides))


def run_cli(*args, cwd, timeout=600, env=None):
    """Run the real `diffcli` command; returns the CompletedProcess (text mode)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([str(DIFFCLI), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def start_training(*args, cwd, run_dir="run", lines=1, timeout=120):
    """A `diffcli train ... hydra.run.dir=run_dir` subprocess, returned once its log.jsonl has `lines` rows."""
    import time

    proc = subprocess.Popen([str(DIFFCLI), "train", *args, f"hydra.run.dir={run_dir}"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = Path(cwd) / run_dir / "log.jsonl", time.time() + timeout
    while not (log.exists() and log.read_text().count("\n") >= lines) and time.time() < deadline:
        time.sleep(0.1)
    return proc


needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


def k_diffusion_sampling():
    """k-diffusion's `sampling` module, the reference for the EDM and DPM-Solver++ samplers, loaded without the
    package's __init__ (it imports clip, which needs pkg_resources). A missing k-diffusion fails the test."""
    import importlib
    import importlib.util
    import types

    if "k_diffusion.sampling" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise ImportError("k-diffusion is not installed: pip install -e '.[dev]' (a test-only reference)")
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling")


def sample_checkpoint(cfg):
    """(LoadedModel, SampleResult) of a `sample` config, in-process: what `diffcli sample` draws, without files."""
    from diffcli.loading import load_model, pick_device
    from diffcli.sampling import draw

    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt, device, cfg.get("net_class"))
    return model, draw(cfg, model, device)
