"""A non-editable install finds its configs: build the wheel, install it into a fresh venv, train."""

import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_ships_configs_and_runs(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("diffcli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "diffcli/configs/train.yaml" in names and "diffcli/configs/data/cifar10.yaml" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the heavy dependencies (torch, ...) come from this environment through a .pth line: the
    # fresh venv gets diffcli itself only from the wheel
    (tmp_path / "venv_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (tmp_path / "venv_deps.pth").rename(f"{site}/zz_deps.pth")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    where = subprocess.run([str(python), "-c", "import diffcli, diffcli.configs; print(diffcli.configs.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert where.startswith(site), where  # the installed copy, not the source tree

    run = subprocess.run([str(env_dir / "bin" / "diffcli"), "train", "data=moons", "train.steps=3",
                          "train.log_every=1", "train.sample_every=0", "hydra.run.dir=run"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "checkpoints" / "ema_3.safetensors").is_file()
