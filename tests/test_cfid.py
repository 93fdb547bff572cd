"""Classifier-feature FID: a small CNN trained on the real MNIST test split (../shared/data), cached as safetensors."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from safetensors import safe_open

from conftest import SHARED_DATA, needs_shared_data
from diffcli import DiffcliError
from diffcli import cfid as clf
from diffcli.cfid import SmallCNN, classifier_fid, classifier_for, classifier_outputs
from diffcli.data import build_data

MNIST = {"name": "mnist", "kind": "torchvision", "root": str(SHARED_DATA), "split": "test", "download": False}


def untrained(images, labels, n_classes, **_):
    """A stand-in for clf._train: an untrained net, so fingerprint/cache tests need no training time."""
    return SmallCNN(images.shape[1], n_classes).eval()


def write_npz(path, images, labels=None):
    np.savez(path, images=images, **({} if labels is None else {"labels": labels}))
    return {"name": path.stem, "kind": "npz", "path": str(path)}


# ---------------------------------------------------------------------------- no data needed


def test_smallcnn_shapes_any_size():
    for channels, size in ((1, 28), (3, 32), (1, 20)):
        net = SmallCNN(channels, 10)
        x = torch.rand(2, channels, size, size) * 2 - 1
        assert net.features(x).shape == (2, 128) and net(x).shape == (2, 10)


def test_outputs_take_uint8_like_imagedata_and_check_channels():
    net = SmallCNN(1, 10)
    u8 = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f, p = classifier_outputs(net, u8, batch_size=3)
    f2, p2 = classifier_outputs(net, u8.float() / 127.5 - 1)
    assert f.shape == (7, 128) and p.shape == (7, 10) and f.dtype == p.dtype == torch.float64
    assert torch.allclose(f, f2, atol=1e-6) and torch.allclose(p, p2, atol=1e-6) and torch.allclose(p.sum(1), torch.ones(7, dtype=torch.float64))
    with pytest.raises(DiffcliError, match="takes"):
        classifier_outputs(net, torch.zeros(2, 3, 28, 28))


def test_default_epochs_give_about_500_steps():
    assert clf.default_epochs(8334) == 8 and clf.default_epochs(60000) == 2 and clf.default_epochs(10**7) == 1


def test_unlabelled_data_is_refused(tmp_path):
    cfg = write_npz(tmp_path / "nolabels.npz", np.zeros((12, 28, 28), np.uint8))
    with pytest.raises(DiffcliError, match="labelled data") as e:
        classifier_for(cfg, cache_dir=tmp_path, device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(DiffcliError, match="labelled data"):
        classifier_for({"name": "moons", "kind": "toy", "params": {}}, cache_dir=tmp_path, device="cpu")


def test_missing_dataset_raises_the_data_error(tmp_path):
    cfg = {**MNIST, "root": str(tmp_path)}
    with pytest.raises(DiffcliError, match="not found"):
        classifier_for(cfg, cache_dir=tmp_path, device="cpu")


def test_tiny_labelled_npz_trains_and_caches_with_metadata(tmp_path):
    # two trivially separable classes: bright left half vs bright right half
    labels = np.arange(240) % 2
    images = np.zeros((240, 12, 12), np.uint8)
    images[labels == 0, :, :6] = 255
    images[labels == 1, :, 6:] = 255
    cfg = write_npz(tmp_path / "halves.npz", images, labels)
    model, info = classifier_for(cfg, cache_dir=tmp_path / "cache", device="cpu", epochs=2)
    assert info["trained_on"] == "5/6 of halves" and (info["n_train"], info["n_test"]) == (200, 40)
    assert info["accuracy"] == 1.0 and model.n_classes == 2
    with safe_open(info["cache"], framework="pt") as f:
        meta = f.metadata()
    assert info["cache"].endswith(f"classifier-halves-{info['fingerprint']}.safetensors")
    assert (float(meta["accuracy"]), meta["trained_on"], meta["n_train"], meta["n_test"], meta["epochs"]) == (
        1.0, "5/6 of halves", "200", "40", "2")
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # the atomic write left no temporary file


# ---------------------------------------------------------------------------- real MNIST


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """One classifier trained on the real MNIST test split, shared by the tests below."""
    cache = tmp_path_factory.mktemp("classifier-cache")
    start = time.perf_counter()
    model, info = classifier_for(MNIST, cache_dir=cache, device="cpu")
    print(f"\nclassifier trained in {time.perf_counter() - start:.1f} s: {info}")
    return model, info, build_data(MNIST, "cpu").images


@pytest.fixture(scope="module")
def scores(mnist):
    """classifier_fid of real, blurred and noise images against the same real reference half."""
    model, _, images = mnist
    # real vs real compares the two halves of the 10,000 test images (5,000 each); only the 1,666 held-out
    # images are unseen by the classifier, too few for a stable 128-d covariance, so both halves are mostly
    # training images. Blurred and noise images are scored against the same reference half.
    reference, real = images[:5000], images[5000:]
    blurred = TF.gaussian_blur(real.float() / 127.5 - 1, kernel_size=5, sigma=1.5)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = {name: classifier_fid(model, x, reference) for name, x in
           (("real", real), ("blurred", blurred), ("noise", noise))}
    print("\ncFID real/real %.3f, real/blurred %.3f, real/noise %.3f" % tuple(out[k]["cfid"] for k in out))
    print("confidence / class_entropy: " + ", ".join(
        f"{k} {v['confidence']:.3f} / {v['class_entropy']:.3f}" for k, v in out.items()))
    return out


@needs_shared_data
@pytest.mark.slow
def test_heldout_accuracy_on_real_mnist(mnist):
    _, info, _ = mnist
    assert info["trained_on"] == "5/6 of the test split"
    assert (info["n_train"], info["n_test"], info["epochs"]) == (8334, 1666, 8)
    assert info["accuracy"] >= 0.97, info


@needs_shared_data
@pytest.mark.slow
def test_cfid_real_far_below_blurred_and_noise(scores):
    real, blurred, noise = (scores[k]["cfid"] for k in ("real", "blurred", "noise"))
    assert 0 <= real and real * 10 < blurred and real * 10 < noise, (real, blurred, noise)


@needs_shared_data
@pytest.mark.slow
def test_confidence_and_balance_real_vs_noise(scores):
    real, noise = scores["real"], scores["noise"]
    assert real["confidence"] > 0.9 and real["class_entropy"] > 0.95, real
    assert noise["confidence"] < real["confidence"]
    assert sum(real["class_counts"]) == 5000


@needs_shared_data
@pytest.mark.slow
def test_cache_reused_and_fingerprint_tracks_data_and_seed(mnist, tmp_path, monkeypatch):
    model, info, images = mnist
    path, cache = info["cache"], Path(info["cache"]).parent
    mtime = os.stat(path).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded, not retrained")

    monkeypatch.setattr(clf, "_train", no_training)
    again, info2 = classifier_for(MNIST, cache_dir=cache, device="cpu")
    assert info2 == info and os.stat(path).st_mtime_ns == mtime
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    # other seed, other epochs, other data: new fingerprints (trained by the stand-in, so no time is spent)
    monkeypatch.setattr(clf, "_train", untrained)
    seed1 = classifier_for(MNIST, cache_dir=cache, device="cpu", seed=1)[1]
    epochs2 = classifier_for(MNIST, cache_dir=cache, device="cpu", epochs=2)[1]
    subset = write_npz(tmp_path / "mnist600.npz", images[:600, 0].numpy(), np.arange(600) % 10)  # any labels do
    other = classifier_for(subset, cache_dir=cache, device="cpu")[1]
    prints = {info["fingerprint"], seed1["fingerprint"], epochs2["fingerprint"], other["fingerprint"]}
    assert len(prints) == 4 and all(Path(i["cache"]).is_file() for i in (seed1, epochs2, other))
    assert other["trained_on"] == "5/6 of mnist600" and (other["n_train"], other["n_test"]) == (500, 100)
