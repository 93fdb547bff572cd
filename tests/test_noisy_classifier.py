"""Classifier guidance with a classifier trained by diffcli: `diffcli train net=mlp_classifier | unet_classifier`
fits p_t(y | x_t) by cross-entropy on noised data of the model's path; `classifier=<ckpt> classifier_scale=s`
adds s grad log p_t(y | x_t) to the score through the Denoiser.

The truth for the toy is the exact Bayes posterior of the noised mixture (Oracle.log_class_probs) and the exact
unconditional denoiser (net=oracle): guided by the learned classifier, it must put the samples in the asked class.
"""

from pathlib import Path

import pytest
import torch

from conftest import compose_config
from diffcli import DiffcliError
from diffcli.build import build_path
from diffcli.toys import eight_gaussians_modes
from diffcli.evaluate import run_eval
from diffcli.summary import summarize
from diffcli.nets import MLPClassifier, UNetClassifier
from diffcli.oracle import Oracle
from diffcli.loading import load_classifier, load_model
from diffcli.sample import run_sample
from diffcli.train import run_train

SETTINGS = ["train=toy", "train.sample_every=0", "train.eval_every=0", "device=cpu"]


def toy(model="vpsde", data="eight_gaussians"):
    return [f"model={model}", f"data={data}", *SETTINGS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A classifier trained on vpsde's path, and the exact denoiser of the same path and data (net=oracle, which
    knows the mixture's classes: guidance=0 takes its unconditional E[x0 | x_t])."""
    root = tmp_path_factory.mktemp("clf")
    out = run_train(compose_config("train", toy() + ["net=mlp_classifier", "train.steps=1500"]), root / "classifier")
    run_train(compose_config("train", toy() + ["net=oracle"]), root / "oracle")
    return {"classifier": root / "classifier", "oracle": root / "oracle", "accuracy": out["accuracy"]}


def test_classifier_nets_give_logits_differentiable_in_x():
    for net, x in ((MLPClassifier((2,), n_classes=8), torch.randn(5, 2)),
                   (UNetClassifier((1, 28, 28), n_classes=10, ch=8, groups=8), torch.randn(5, 1, 28, 28))):
        x.requires_grad_(True)
        logits = net(x, torch.rand(5))
        assert logits.shape == (5, net.n_classes)
        grad, = torch.autograd.grad(logits.log_softmax(1)[:, 0].sum(), x)
        assert grad.shape == x.shape and grad.abs().sum() > 0
    with pytest.raises(DiffcliError, match="at least 2 classes"):
        MLPClassifier((2,), n_classes=1)


def test_trained_classifier_is_near_the_bayes_posterior(runs):
    """The learned p_t(y | x_t) against the exact posterior of the noised mixture, on x_t drawn from the path."""
    device = torch.device("cpu")
    loaded = load_model(str(runs["oracle"]), device)
    model, train_cfg, shape = loaded.denoiser, loaded.config, loaded.shape
    learned = load_classifier(str(runs["classifier"]), device, loaded)
    exact = Oracle(shape, {"kind": "toy", "name": "eight_gaussians"}, build_path(train_cfg.model.path), "x0")
    g = torch.Generator().manual_seed(3)
    modes, std = eight_gaussians_modes()
    y = torch.randint(0, 8, (4000,), generator=g)
    x0 = modes[y] + std * torch.randn(4000, 2, generator=g)
    for t_val in (0.05, 0.3, 0.6):
        t = torch.full((4000,), t_val)
        x_t = model.path.marginal(x0, torch.randn(4000, 2, generator=g), t)
        with torch.no_grad():
            p, q = learned(x_t, t).exp(), exact.log_class_probs(x_t.double(), t.double()).exp().float()
        tv = 0.5 * (p - q).abs().sum(1).mean().item()
        assert tv < 0.05, (t_val, tv)  # measured 0.001-0.02
    assert runs["accuracy"]["t=0.05"] > 0.99  # the modes are 14 std apart at t = 0


def test_guidance_by_the_trained_classifier_puts_samples_in_the_class(runs, tmp_path):
    modes, _ = eight_gaussians_modes()
    share = {}
    for s in (0.0, 1.0, 3.0):
        overrides = [f"ckpt={runs['oracle']}", f"classifier={runs['classifier']}", f"classifier_scale={s}",
                     "guidance=0", "label=3", "n=400", "sampler=euler", "steps=40", "device=cpu"]
        out = run_sample(compose_config("sample", overrides), tmp_path / str(s))
        share[s] = (torch.cdist(out.samples, modes).argmin(1) == 3).double().mean().item()
    # scale 0 samples the mixture (1/8 in each mode); 1 is Bayes' conditional score with the learned classifier
    assert share[0.0] < 0.25 and share[1.0] > 0.9 and share[3.0] > 0.95, share


def test_eval_sweeps_the_classifier_scale(runs, tmp_path):
    agreement = []
    for s in (0.0, 2.0):
        overrides = [f"ckpt={runs['oracle']}", f"classifier={runs['classifier']}", f"classifier_scale={s}",
                     "guidance=0", "n=400", "sampler=euler", "steps=40", "device=cpu"]
        record = run_eval(compose_config("eval", overrides), tmp_path / str(s))
        assert record["classifier_scale"] == s and record["labels"] == list(range(8))
        agreement.append(record["metrics"]["agreement"])
    assert agreement[0] < 0.3 and agreement[1] > 0.9, agreement
    summary = summarize(tmp_path)
    assert Path(summary["classifier_scale_plot"]).stat().st_size > 10000


def test_bad_classifier_requests_are_one_line(runs, tmp_path):
    oracle, classifier = runs["oracle"], runs["classifier"]
    cases = [
        ([f"ckpt={classifier}"], "is a noise-conditional classifier"),
        ([f"ckpt={oracle}", f"classifier={oracle}"], "is a denoising model, not a classifier"),
        ([f"ckpt={oracle}", "classifier_scale=2"], "needs classifier="),
        ([f"ckpt={oracle}", f"classifier={classifier}", "label=8"], "class 8 does not exist"),
    ]
    for overrides, message in cases:
        with pytest.raises(DiffcliError, match=message):
            run_sample(compose_config("sample", overrides + ["n=4", "device=cpu"]), tmp_path)
    other = tmp_path / "flow_classifier"  # the same data on another path: its t means something else
    run_train(compose_config("train", toy("flow") + ["net=mlp_classifier", "train.steps=2"]), other)
    with pytest.raises(DiffcliError, match="train the classifier with the model's model= and data= settings"):
        run_sample(compose_config("sample", [f"ckpt={oracle}", f"classifier={other}", "n=4", "device=cpu"]), tmp_path)


def test_classifier_training_refusals(tmp_path):
    with pytest.raises(DiffcliError, match="moons has no class labels"):
        run_train(compose_config("train", toy(data="moons") + ["net=mlp_classifier", "train.steps=2"]), tmp_path / "a")
    with pytest.raises(DiffcliError, match="not a class-conditional model: drop model.cond=class"):
        run_train(compose_config("train", toy() + ["net=mlp_classifier", "model.cond=class", "train.steps=2"]),
                  tmp_path / "b")


def test_companions_match_paths_by_their_built_arguments():
    """A checkpoint stored before a path argument existed (no zero_terminal_snr key) still matches a model whose
    config spells the default out; a different value does not."""
    from diffcli.build import path_arguments

    old = {"_target_": "diffcli.paths.DDPMPath", "T": 1000, "schedule": "linear"}
    assert path_arguments(old) == path_arguments({**old, "zero_terminal_snr": False, "beta_end": 0.02})
    assert path_arguments(old) != path_arguments({**old, "zero_terminal_snr": True})
