"""Toy metrics against closed forms, and `diffcli eval` writing metrics.json."""

import json
import math

import pytest
import torch

from conftest import compose_config
from diffcli import DiffcliError
from diffcli.toys import eight_gaussians, eight_gaussians_modes
from diffcli.evaluate import run_eval
from diffcli.metrics import sliced_wasserstein
from diffcli.scoring import mode_coverage
from diffcli.train import run_train


def test_sliced_wasserstein_of_shifted_gaussians():
    """N(0, I) vs N(mu, I) in d dims: every projection is shifted by theta.mu, so SW2 = |mu| / sqrt(d)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 2, generator=g)
    mu = torch.tensor([1.2, -0.9])
    y = torch.randn(20_000, 2, generator=g) + mu
    assert sliced_wasserstein(x, y, n_proj=2000) == pytest.approx(mu.norm().item() / math.sqrt(2), rel=0.03)
    assert sliced_wasserstein(x, torch.randn(20_000, 2, generator=g)) < 0.03


def test_mode_coverage_counts_missing_and_off_mode_samples():
    g = torch.Generator().manual_seed(0)
    modes, std = eight_gaussians_modes()
    x = eight_gaussians(8000, generator=g, device="cpu")
    keep = torch.cdist(x, modes).argmin(1) != 3  # drop one mode entirely
    x = torch.cat([x[keep], torch.zeros(500, 2)])  # and add off-manifold points at the origin
    cov = mode_coverage(x, modes, std)
    assert cov["modes_covered"] == 7 and cov["mode_counts"][3] == 0
    assert cov["in_modes"] == pytest.approx(keep.sum().item() / len(x), abs=0.01)


def test_eval_writes_metrics(tmp_path):
    run_train(compose_config("train", ["data=eight_gaussians", "train.steps=20", "train.log_every=10",
                                       "train.sample_every=0", "device=cpu"]), tmp_path / "run")
    record = run_eval(compose_config("eval", [f"ckpt={tmp_path / 'run'}", "sampler=ddim", "steps=10", "n=400",
                                              "device=cpu"]), tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["nfe"] == 10 and saved["step"] == 20 and saved["n"] == 400 and saved["sampler"] == "ddim"
    assert {"sliced_wasserstein", "mmd", "energy_distance", "modes_covered"} <= saved["metrics"].keys()
    assert saved["metric_settings"]["names"] == "auto" and saved["model"] == "ddpm"
    assert (tmp_path / "eval" / "samples.png").is_file()


def _inception_random_weights(file):
    """torch-fidelity's Inception-v3 with He-initialised random weights saved as a local file (no download)."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():  # PyTorch's default init shrinks activations to ~1e-8 by pool3; He init keeps them O(1)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), file)
    return file


@pytest.fixture(scope="module")
def image_oracle(tmp_path_factory):
    """A flow 'model' of 48 real-looking 8x8 images (net=oracle: exact, no training) and their npz."""
    import numpy as np

    tmp = tmp_path_factory.mktemp("img")
    g = np.random.default_rng(0)
    blobs = np.clip(g.normal(128, 60, (48, 1, 1)) + g.normal(0, 20, (48, 8, 8)), 0, 255).astype(np.uint8)
    np.savez(tmp / "x.npz", images=blobs)
    run_train(compose_config("train", ["data=npz", f"data.path={tmp / 'x.npz'}", "net=oracle", "model=flow",
                                       "device=cpu"]), tmp / "run")
    return tmp


def test_eval_fid_kid_end_to_end_with_local_inception_weights(image_oracle, tmp_path, monkeypatch):
    """The whole FID/KID path (torch-fidelity's TF-exact Inception, reference cache, KID) with random weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    weights = _inception_random_weights(tmp_path / "inception.pth")
    args = [f"ckpt={image_oracle / 'run'}", f"data.path={image_oracle / 'x.npz'}", "metric=fid",
            f"metric.inception_weights={weights}",
            f"metric.cache_dir={tmp_path / 'cache'}", "metric.kid_subset_size=20", "metric.kid_subsets=5",
            "sampler=euler", "steps=8", "n=24", "device=cpu"]
    record = run_eval(compose_config("eval", args), tmp_path / "e1")
    m = record["metrics"]
    assert m["fid"] > 0 and math.isfinite(m["kid"]) and m["kid_subset_size"] == 20
    assert m["fid_reference"] == "npz-x (48 images)"
    assert record["sampler"] == "euler" and record["nfe"] == 8 and record["n"] == 24
    cached = list((tmp_path / "cache").glob("inception-*.safetensors"))
    assert len(cached) == 1  # the reference features, cached by data fingerprint
    again = run_eval(compose_config("eval", args), tmp_path / "e2")  # from the cache: the same numbers
    assert again["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-9)
    # the real images against themselves: FID ~ 0 and far below the samples' (8 Euler steps of an exact flow
    # come close to the data, so compare with noise images instead)
    from diffcli.inception import fid_kid, inception_features, load_inception

    net = load_inception(weights, torch.device("cpu"))
    real = inception_features(net, torch.from_numpy(__import__("numpy").load(image_oracle / "x.npz")["images"])[:, None])
    noise = inception_features(net, torch.rand(48, 1, 8, 8) * 2 - 1)
    assert fid_kid(real, real, subset_size=20, subsets=2)["fid"] < 1e-6 * fid_kid(noise, real, subset_size=20)["fid"]


def test_eval_without_inception_weights_says_which_file_to_place_where(image_oracle, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    data = f"data.path={image_oracle / 'x.npz'}"
    with pytest.raises(DiffcliError, match=r"weights-inception-2015-12-05-6726825d\.pth.*hub/checkpoints"):
        run_eval(compose_config("eval", [f"ckpt={image_oracle / 'run'}", data, "metric=fid", "device=cpu"]),
                 tmp_path / "e")
    with pytest.raises(DiffcliError, match="no such file"):
        run_eval(compose_config("eval", [f"ckpt={image_oracle / 'run'}", data, "metric=kid", "device=cpu",
                                         f"metric.inception_weights={tmp_path / 'missing.pth'}"]), tmp_path / "e")


def test_eval_refuses_metrics_of_the_other_kind(image_oracle, tmp_path):
    with pytest.raises(DiffcliError, match="metric nll is not available for image data.*bpd"):
        run_eval(compose_config("eval", [f"ckpt={image_oracle / 'run'}", "metric=nll", "device=cpu"]), tmp_path / "e")


def test_sampler_steps_without_a_sampler_sets_the_default_samplers_steps(tmp_path):
    from diffcli.sampling import sampler_config

    cfg = compose_config("eval", ["sampler.steps=7"])
    chosen = sampler_config(cfg, compose_config("train", ["model=flow"]).model)
    assert chosen.steps == 7 and chosen.fn._target_.endswith("euler")  # flow's own sampler
    assert sampler_config(compose_config("eval"), compose_config("train", ["model=flow"]).model).steps is None


def test_train_eval_every_logs_a_metric_and_survives_resume(tmp_path):
    base = ["data=eight_gaussians", "train.steps=30", "train.log_every=10", "train.eval_every=10", "train.eval_n=200",
            "train.sample_every=0", "train.ckpt_every=10", "sampler=ddim", "steps=5", "device=cpu"]
    run_train(compose_config("train", base), tmp_path / "run")
    rows = [json.loads(r) for r in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["sliced_wasserstein"] < rows[0]["sliced_wasserstein"]  # training helps
    # resuming from step 20 drops the row of step 30 and writes it again, once, with the same value (exact resume)
    for f in (tmp_path / "run" / "checkpoints").glob("*_30.safetensors"):
        f.unlink()
    run_train(compose_config("train", base + [f"train.resume={tmp_path / 'run'}"]), tmp_path / "x")
    assert [json.loads(r) for r in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()] == rows


def test_train_eval_every_needs_labelled_images(tmp_path):
    import numpy as np

    np.savez(tmp_path / "x.npz", images=np.zeros((8, 8, 8), dtype=np.uint8))
    with pytest.raises(DiffcliError, match="needs labelled images"):
        run_train(compose_config("train", ["data=npz", f"data.path={tmp_path / 'x.npz'}", "net.ch=8", "net.ch_mult=[1]",
                                           "train.steps=1", "train.eval_every=1", "device=cpu"]), tmp_path / "run")


def test_eval_nll_of_the_oracle_equals_the_datas_own_entropy(tmp_path):
    """An exact model (net=oracle, flow) has NLL = E[-log p_data] on the same points, up to ODE error."""
    run_train(compose_config("train", ["data=gmm", "net=oracle", "model=flow", "device=cpu"]), tmp_path / "run")
    record = run_eval(compose_config("eval", [f"ckpt={tmp_path / 'run'}", "metric=nll", "metric.nll_n=64",
                                              "device=cpu"]), tmp_path / "e")
    m = record["metrics"]
    assert m["nll"] == pytest.approx(m["nll_data"], abs=2e-3)
    assert m["nll_data"] > 1.0 and m["nll_sem"] > 0 and record["sampler"] is None  # no sampling for NLL
    assert not (tmp_path / "e" / "samples.png").exists()


def test_eval_bpd_of_an_image_model(image_oracle, tmp_path):
    """bits/dim end to end: the same number as bits_per_dim on those images, and above 8 for this model.

    The oracle of a point set memorises its 48 images (a sum of point masses, smoothed only to sigma(t_min)):
    dequantized pixels, up to 1/128 away from every point, get a density far below the uniform one (8 bits/dim).
    """
    import numpy as np

    from diffcli.likelihood import bits_per_dim
    from diffcli.loading import load_model

    record = run_eval(compose_config("eval", [f"ckpt={image_oracle / 'run'}", f"data.path={image_oracle / 'x.npz'}",
                                              "metric=bpd", "metric.nll_n=4",
                                              "metric.rtol=1e-3", "metric.atol=1e-3", "device=cpu"]), tmp_path / "e")
    m = record["metrics"]
    assert m["bpd"] > 8 and m["bpd_images"] == "npz-x (4)" and m["bpd_nfe"] > 0
    denoiser = load_model(str(image_oracle / "run"), torch.device("cpu")).denoiser
    images = torch.from_numpy(np.load(image_oracle / "x.npz")["images"][:4, None])
    direct = bits_per_dim(denoiser, images, generator=torch.Generator().manual_seed(0), rtol=1e-3, atol=1e-3)
    assert m["bpd"] == pytest.approx(direct["bpd"].mean().item(), rel=1e-9)


@pytest.mark.slow
def test_eval_sweep_and_summary_from_the_command_line(tmp_path):
    """`diffcli eval -m sampler.steps=...` then `diffcli summary`: one row per job, a CSV and a quality-vs-NFE plot."""
    import csv

    from conftest import run_cli

    run_train(compose_config("train", ["data=eight_gaussians", "train.steps=200", "train.log_every=100",
                                       "train.sample_every=0", "device=cpu"]), tmp_path / "run")
    sweep = run_cli("eval", "-m", f"ckpt={tmp_path / 'run'}", "sampler=ddim", "sampler.steps=2,20", "n=500",
                    "device=cpu", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    out = run_cli("summary", str(tmp_path / "sweep"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 evaluations" in out.stdout and "quality_vs_nfe.png" in out.stdout
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert [int(r["nfe"]) for r in rows] == [2, 20]
    assert float(rows[1]["sliced_wasserstein"]) < float(rows[0]["sliced_wasserstein"])  # more steps, closer
    assert (tmp_path / "sweep" / "quality_vs_nfe.png").stat().st_size > 10_000
    (tmp_path / "empty").mkdir()
    missing = run_cli("summary", str(tmp_path / "empty"), cwd=tmp_path)
    assert missing.returncode == 2 and "no metrics.json" in missing.stderr and "Traceback" not in missing.stderr
