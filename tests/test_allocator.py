"""diffcli.allocator: glibc keeps a training step's freed memory, counted by the kernel's page-fault counter."""

import os
import platform
import subprocess
import sys

import pytest

from diffcli import allocator, cli

GLIBC = platform.libc_ver()[0] == "glibc"

# a small eager training step (activations of 2 MiB, as a U-Net's at batch 16, 32x32) in a fresh process;
# prints the minor page faults per step after warm-up
STEP = """
import resource, sys, torch
from torch import nn
from diffcli.allocator import keep_freed_memory
if sys.argv[1] == "kept" and not keep_freed_memory():
    raise SystemExit("keep_freed_memory() did not take")
torch.manual_seed(0)
torch.set_num_threads(2)
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1),
                    nn.SiLU(), nn.Conv2d(32, 3, 3, padding=1))
x = torch.randn(16, 3, 32, 32)
def step():
    net(x).square().mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_step(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", STEP, mode], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_a_training_step_no_longer_faults_its_memory_in():
    default, kept = faults_per_step("default"), faults_per_step("kept")
    if default < 500:
        pytest.skip(f"this glibc faults only {default:.0f} pages per step by default: nothing to remove")
    assert kept < 0.1 * default, (default, kept)


@pytest.mark.parametrize("name", allocator.USER_SETTINGS)
def test_a_users_own_malloc_settings_are_left_alone(monkeypatch, name):
    called = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: called.append(a))
    monkeypatch.setenv(name, "131072")
    assert allocator.keep_freed_memory() is False
    assert called == []


def test_every_command_runs_with_it(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("keep_freed_memory") or True)
    monkeypatch.setattr(cli, "_hydra_app", lambda command: lambda: calls.append(command))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for name in ("HYDRA_FULL_ERROR", "DIFFCLI_TRACEBACK"):
        monkeypatch.setenv(name, os.environ.get(name, "0"))
    for command in ("train", "sample", "eval"):
        cli.main([command])
    assert calls == ["keep_freed_memory", "train", "keep_freed_memory", "sample", "keep_freed_memory", "eval"]
