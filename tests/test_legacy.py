"""Checkpoints written before the application-layer redesign (tests/fixtures/legacy, by commit 437de3e) load and
sample bit-identically: the same labels, time grid and NFE that commit wrote, and the same first batch of samples.

Later batches differ on purpose since issue 26: each batch now draws from its own seed (sampling.batch_seed) so
that torchrun's ranks can split them, where 437de3e drew every batch from one running generator."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_config
from diffcli.sample import run_sample

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
MANIFEST = json.loads((LEGACY / "manifest.json").read_text())["samples"]


def _in_fixtures(override: str) -> str:
    """ckpt=, guide= and classifier= name files of the fixture folder."""
    key, value = override.split("=", 1)
    return f"{key}={LEGACY / value}" if key in ("ckpt", "guide", "classifier") else override


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_legacy_checkpoint_samples_bit_identically(name, tmp_path):
    cfg = compose_config("sample", [*map(_in_fixtures, MANIFEST[name]), "device=cpu"])
    run_sample(cfg, tmp_path)
    then, now = np.load(LEGACY / f"{name}_samples.npz"), np.load(tmp_path / "samples.npz")
    assert sorted(then.files) == sorted(now.files)
    first = int(next(o for o in MANIFEST[name] if o.startswith("batch_size=")).split("=")[1])
    assert np.array_equal(then["samples"][:first], now["samples"][:first])
    assert len(then["samples"]) == len(now["samples"]) > first  # every fixture has a second batch
    for key in set(then.files) - {"samples"}:
        assert np.array_equal(then[key], now[key]), key
