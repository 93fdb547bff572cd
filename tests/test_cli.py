"""The real `diffcli` command in subprocesses: help, version, and one-line errors with exit code 2."""

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from diffcli import __version__


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffcli: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bare_help_and_version(tmp_path):
    for args in [(), ("--help",)]:
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 0 and "train" in r.stdout and "sample" in r.stdout and "eval" in r.stdout
    r = run_cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"diffcli {__version__}"


def test_unknown_subcommand(tmp_path):
    assert_one_line_error(run_cli("trian", cwd=tmp_path), "trian", "train, sample, eval, edit, distill, summary")


@pytest.mark.parametrize("command, groups", [("train", ["data=", "model=", "net=", "sampler=", "train="]),
                                             ("sample", ["sampler="])])
def test_subcommand_help_lists_its_groups(tmp_path, command, groups):
    r = run_cli(command, "--help", cwd=tmp_path)
    assert r.returncode == 0 and f"diffcli {command}" in r.stdout
    for group in groups:
        assert group in r.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    r = run_cli("train", "data=cifar10", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0
    assert "diffcli.nets.UNet" in r.stdout and "ch: 128" in r.stdout and not (tmp_path / "outputs").exists()


def test_unknown_config_option_and_key(tmp_path):
    assert_one_line_error(run_cli("train", "data=mnistt", cwd=tmp_path), "data/mnistt", "mnist, moons")
    assert_one_line_error(run_cli("train", "train.stepz=3", cwd=tmp_path), "train.stepz")


UNREAD = [("train", "train.stepz=5", "train.stepz is not a key of diffcli train (did you mean train.steps?)"),
          ("train", "metric=fid", "diffcli train has no metric= group"),
          ("sample", "model=flow", "diffcli sample has no model= group"),
          ("sample", "data=moons", "diffcli sample has no data= group"),
          ("eval", "train.steps=3", "train.steps is not a key of diffcli eval")]


@pytest.mark.parametrize("command, override, fragment", UNREAD, ids=[f"{c} {o}" for c, o, _ in UNREAD])
def test_unread_keys_and_groups_are_refused_with_or_without_plus(tmp_path, command, override, fragment):
    """Hydra's hint 'use +key' must not lead to a run that ignores the key: both spellings are the same refusal."""
    for given in (override, f"+{override}"):
        r = run_cli(command, given, cwd=tmp_path)
        assert_one_line_error(r, fragment, f"diffcli {command} --help")
        assert "+" not in r.stderr, r.stderr  # no hint toward the plus
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, fragment", [(["steps=0"], "steps=0"), (["steps=-3"], "steps=-3"),
                                            (["sampler=ddim", "eta=-0.1"], "eta=-0.1")])
def test_bad_sampling_values(tmp_path, args, fragment):
    assert_one_line_error(run_cli("sample", *args, cwd=tmp_path), fragment)


def test_bad_checkpoints(tmp_path):
    assert_one_line_error(run_cli("sample", cwd=tmp_path), "no training run")  # nothing under ./outputs/
    assert_one_line_error(run_cli("sample", "ckpt=missing/run", cwd=tmp_path), "missing/run", "does not exist")
    (tmp_path / "notes.safetensors").write_text("not a checkpoint")
    assert_one_line_error(run_cli("sample", "ckpt=notes.safetensors", cwd=tmp_path), "notes.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    assert_one_line_error(run_cli("sample", "ckpt=other.safetensors", cwd=tmp_path), "not a diffcli checkpoint")
    (tmp_path / "plain_dir").mkdir()
    assert_one_line_error(run_cli("sample", "ckpt=plain_dir", cwd=tmp_path), "plain_dir")


def test_truncated_checkpoint(tmp_path):
    """A run's checkpoint cut short (a crash while copying it, a full disk) is refused in one line."""
    r = run_cli("train", "data=moons", "train.steps=2", "train.log_every=1", "train.sample_every=0", "hydra.run.dir=run",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = next((tmp_path / "run" / "checkpoints").glob("ema_*.safetensors"))
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_one_line_error(run_cli("sample", "ckpt=run", cwd=tmp_path), "truncated")


def test_bad_model_settings(tmp_path):
    assert_one_line_error(run_cli("train", "model.prediction=noise", cwd=tmp_path), "model.prediction=noise")
    assert_one_line_error(run_cli("train", "model.path.beta_end=2.0", cwd=tmp_path), "beta_end")
    assert_one_line_error(run_cli("train", "net=unet_small", cwd=tmp_path), "net=mlp")
    assert_one_line_error(run_cli("train", "train.lr_schedule=linear", cwd=tmp_path), "train.lr_schedule=linear",
                          "constant, cosine")


def test_sampler_option_without_a_sampler_says_to_choose_one(tmp_path):
    assert_one_line_error(run_cli("sample", "sampler.fn.n_steps=3", cwd=tmp_path), "choose the sampler too")


def test_hydra_flag_conflicts_and_bad_metrics_are_one_line(tmp_path):
    assert_one_line_error(run_cli("train", "-m", "model=ddpm", "--cfg", "hydra", cwd=tmp_path), "Only one of")
    assert_one_line_error(run_cli("eval", "metric=fidd", cwd=tmp_path), "metric/fidd", "cfid, fid")
    assert_one_line_error(run_cli("summary", str(tmp_path), cwd=tmp_path), "no metrics.json")
