"""Each formulation trains on eight_gaussians with net=mlp and, sampled with its default sampler,
covers all eight modes; samplers refuse formulations they are not valid for."""

import pytest
import torch

from conftest import compose_config, run_cli, sample_checkpoint
from diffcli import DiffcliError
from diffcli.toys import eight_gaussians_modes
from diffcli.scoring import mode_coverage
from diffcli.train import run_train

FORMULATIONS = {
    "ddpm": ["model=ddpm"], "ncsn": ["model=ncsn"], "vesde": ["model=vesde"], "vpsde": ["model=vpsde"],
    "subvpsde": ["model=subvpsde"], "vpsde-likelihood-fourier": ["model=vpsde", "model.weighting=likelihood",
                                                                 "net.time_embedding=fourier"],
    "flow": ["model=flow"], "flow-uniform": ["model=flow", "model.prior=uniform"],
    "flow-ot": ["model=flow", "model.coupling=ot"],
    "ddpm-zero-terminal-snr-v": ["model=ddpm", "model.path.zero_terminal_snr=true", "model.prediction=v"],
}


def train_toy(tmp_path, overrides, steps=800):
    run_train(compose_config("train", ["data=eight_gaussians", f"train.steps={steps}", "train.batch_size=256",
                                       "train.sample_every=0", "train.log_every=200", "device=cpu", *overrides]),
              tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMULATIONS))
def test_formulation_trains_and_covers_all_modes(tmp_path, name):
    run = train_toy(tmp_path, FORMULATIONS[name])
    _, out = sample_checkpoint(compose_config("sample", [f"ckpt={run}", "n=2000", "batch_size=2000", "device=cpu"]))
    modes, std = eight_gaussians_modes()
    coverage = mode_coverage(out.samples, modes, std)
    assert coverage["modes_covered"] == 8, coverage
    assert coverage["in_modes"] > 0.3, coverage  # most samples on the data, not smeared between modes


def test_samplers_refuse_a_uniform_prior(tmp_path):
    run = train_toy(tmp_path, ["model=flow", "model.prior=uniform"], steps=2)
    for sampler, extra in [("euler_maruyama", []), ("langevin", []), ("ancestral", ["steps=5"]),
                           ("ddim", ["steps=5", "eta=1"])]:
        with pytest.raises(DiffcliError, match="Gaussian prior") as e:
            sample_checkpoint(compose_config("sample", [f"ckpt={run}", f"sampler={sampler}", "n=4", "device=cpu",
                                                        *extra]))
        assert "sampler=euler" in str(e.value)
    # deterministic DDIM is a valid ODE step for any prior
    _, out = sample_checkpoint(compose_config("sample", [f"ckpt={run}", "sampler=ddim", "steps=5", "eta=0", "n=4",
                                                         "device=cpu"]))
    assert out.nfe == 5 and torch.isfinite(out.samples).all()


@pytest.mark.parametrize("args, fragment", [
    (["model=vesde", "model.prediction=v"], "variance-preserving"),
    (["model=flow", "model.prior=uniform", "model.prediction=eps"], "Gaussian prior"),
    (["model=flow", "model.prior=uniform", "model.weighting=sigma2"], "Gaussian prior"),
    (["model=vesde", "model.path.sigma_min=10"], "sigma_min"),
    (["model=vpsde", "model.path.beta_min=30"], "beta_min"),
    (["model=ncsn", "model.path.L=1"], "L=1"),
    (["model=vpsde", "model.path.eps=1.5"], "eps"),
    (["model=flow", "model.coupling=sinkhorn"], "coupling"),
    (["model=ddpm", "model.path.zero_terminal_snr=true"], "alpha > 0 at t = 1"),
])
def test_bad_formulation_settings_are_one_line_errors(tmp_path, args, fragment):
    r = run_cli("train", "data=moons", "train.steps=1", *args, cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr
