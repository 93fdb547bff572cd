"""The classifier-FID feature network (not the guidance classifier, guidance.NoisyClassifier): a small CNN trained
once per dataset, cached as safetensors, whose features give a Fréchet distance for MNIST-like data.

Inception features are made for 299x299 photographs and need a download; a CNN trained on the
dataset itself gives features that work offline and are sensitive to digit/garment shape.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import nn

from . import DiffcliError
from .checkpoint import save_atomic
from .data import build_data, file_label, to_float
from .metrics import class_balance, frechet_distance

# part of the cache fingerprint: bump it whenever SmallCNN or the training recipe changes
ARCH_VERSION = "smallcnn-v1"
FEATURE_DIM = 128
HOLDOUT = 6  # without a train split, 1/HOLDOUT of the labelled images is held out for accuracy
BATCH = 128
# the default length is set in optimizer steps, not epochs: 3 epochs of the offline fallback (8,334 MNIST
# test images, 66 steps each) stop at ~97.3% held-out accuracy, ~500 steps (8 epochs) reach ~98%, while
# 60,000 training images need only 2 epochs for the same number of steps
TARGET_STEPS = 500


class SmallCNN(nn.Module):
    """conv 32 -> max pool -> conv 64 -> adaptive max pool 7x7 -> 128-d features -> n_classes logits."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10):
        super().__init__()
        self.in_channels, self.n_classes = in_channels, n_classes
        self.body = nn.Sequential(
            # pooling before ReLU (they commute) runs the ReLU and its backward on 4x fewer values
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            # adaptive pooling: 28x28 gives exactly a 2x2 max pool, other sizes still fit the linear layer
            nn.Conv2d(32, 64, 3, padding=1), nn.AdaptiveMaxPool2d(7), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128) penultimate activations of images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_classes) logits."""
        return self.head(self.features(x))


# ---------------------------------------------------------------------------- data


def _plain(data_cfg) -> dict:
    """A resolved, independent dict copy of the data config."""
    if isinstance(data_cfg, DictConfig):
        return OmegaConf.to_container(data_cfg, resolve=True)
    return copy.deepcopy(dict(data_cfg))


def _labelled(cfg: dict, device, seed):
    """(uint8 images, int64 labels) of the data `cfg` describes, or a DiffcliError if it has no labels."""
    data = build_data(OmegaConf.create(cfg), device, seed)
    if not getattr(data, "is_image", False) or data.labels is None:
        raise DiffcliError(f"classifier-FID needs labelled data (MNIST, Fashion-MNIST or an npz with 'labels'); "
                           f"data {cfg.get('name', cfg.get('kind'))} has none")
    if data.labels.min() < 0:
        raise DiffcliError(f"data {cfg.get('name')} has negative labels; classifier-FID needs classes 0..K-1")
    return data.images, data.labels


def _holdout(images, labels, seed):
    """A seeded 5/6 train, 1/6 held-out split: ((train images, labels), (held-out images, labels))."""
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).to(images.device)
    n_test = len(images) // HOLDOUT
    test, train = perm[:n_test], perm[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def _train_test(cfg: dict, device, seed):
    """(train pair, test pair, trained_on): the train/test splits, else a held-out part of what exists."""
    if cfg.get("kind") != "torchvision":  # npz / folder files have no split concept
        train, test = _holdout(*_labelled(cfg, device, seed), seed)
        return train, test, f"5/6 of {cfg.get('name', 'the images')}"
    found, errors = {}, {}
    for split in ("train", "test"):
        try:
            found[split] = _labelled({**cfg, "split": split}, device, seed)
        except DiffcliError as e:  # a missing split (e.g. only MNIST's test files offline)
            errors[split] = e
    if len(found) == 2:
        return found["train"], found["test"], "train split"
    if not found:
        raise errors.get(cfg.get("split", "train"), errors["train"])
    split, pair = next(iter(found.items()))
    train, test = _holdout(*pair, seed)
    return train, test, f"5/6 of the {split} split"


def _fingerprint(images, labels, epochs, seed) -> str:
    """First 16 hex digits of sha256 over training images, labels, architecture version, epochs and seed."""
    h = hashlib.sha256()
    h.update(images.cpu().contiguous().numpy().tobytes())
    h.update(labels.cpu().to(torch.int64).contiguous().numpy().tobytes())
    h.update(f"{ARCH_VERSION}|epochs={epochs}|seed={seed}".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- training


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (as ImageData does), channels-last; float images keep their values."""
    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    # channels-last halves the CPU time of the convolutions and max pools (oneDNN's native layout)
    return x.contiguous(memory_format=torch.channels_last)


def _train(images, labels, n_classes, *, epochs, seed, log) -> SmallCNN:
    """Adam (lr 1e-3, batch 128) for `epochs` epochs; weights and batch order are functions of seed."""
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = SmallCNN(images.shape[1], n_classes).to(images.device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm, total = torch.randperm(len(images), generator=g).to(images.device), 0.0
        for idx in perm.split(BATCH):
            loss = F.cross_entropy(model(_to_float(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(images))
    return model.eval()


@torch.no_grad()
def _accuracy(model, images, labels) -> float:
    """Top-1 accuracy on uint8 images."""
    _, probs = classifier_outputs(model, images)
    return (probs.argmax(1) == labels.cpu()).double().mean().item()


def _load(path: Path, device):
    """(model, metadata) from a cached classifier, or None if the file is unreadable or not one of ours."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "diffcli-classifier":
            return None
        model = SmallCNN(int(meta["in_channels"]), int(meta["n_classes"]))
        model.load_state_dict(state)
    except Exception:  # a truncated or foreign file is retrained and overwritten, not fatal
        return None
    return model.to(device, memory_format=torch.channels_last).eval(), meta


def default_epochs(n_train: int) -> int:
    """Enough epochs over n_train images for about TARGET_STEPS optimizer steps (at least one)."""
    return max(1, math.ceil(TARGET_STEPS / math.ceil(n_train / BATCH)))


def classifier_for(data_cfg, *, cache_dir, device, seed=0, epochs=None, log=None) -> tuple[SmallCNN, dict]:
    """The (cached) classifier for `data_cfg`'s dataset and its info (accuracy, trained_on, sizes, cache path)."""
    log = log or logging.getLogger("diffcli")
    cfg, device = _plain(data_cfg), torch.device(device)
    (train_x, train_y), (test_x, test_y), trained_on = _train_test(cfg, device, seed)
    epochs = default_epochs(len(train_x)) if epochs is None else int(epochs)
    if epochs < 1:
        raise DiffcliError(f"classifier epochs={epochs} must be at least 1")
    fingerprint = _fingerprint(train_x, train_y, epochs, seed)
    name = file_label(cfg.get("name", "images"))  # a stored data.name must not steer where the file goes
    path = Path(cache_dir).expanduser() / f"classifier-{name}-{fingerprint}.safetensors"
    info = {"trained_on": trained_on, "n_train": len(train_x), "n_test": len(test_x), "epochs": epochs,
            "fingerprint": fingerprint, "cache": str(path)}
    cached = _load(path, device) if path.is_file() else None
    if cached is not None:
        model, meta = cached
        log.info("classifier %s loaded from cache (accuracy %.4f)", path, float(meta["accuracy"]))
        return model, {"accuracy": float(meta["accuracy"]), **info}
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    log.info("training classifier on %s (%d images, %d epochs)", trained_on, len(train_x), epochs)
    start = time.perf_counter()
    model = _train(train_x, train_y, n_classes, epochs=epochs, seed=seed, log=log)
    accuracy = _accuracy(model, test_x, test_y)
    log.info("classifier accuracy %.4f on %d held-out images (%.1f s)", accuracy, len(test_x),
             time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "diffcli-classifier", "arch": ARCH_VERSION, "accuracy": repr(accuracy),
            "trained_on": trained_on, "n_train": str(len(train_x)), "n_test": str(len(test_x)),
            "epochs": str(epochs), "seed": str(seed), "in_channels": str(model.in_channels),
            "n_classes": str(n_classes)}
    save_atomic(model.state_dict(), meta, path)
    return model, {"accuracy": accuracy, **info}


# ---------------------------------------------------------------------------- scoring


@torch.no_grad()
def classifier_outputs(model, images: torch.Tensor, batch_size=500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (B, 128), class probabilities (B, n_classes)) as float64 on the CPU."""
    if images.ndim != 4 or images.shape[1] != model.in_channels:
        raise DiffcliError(f"the classifier takes ({model.in_channels}, H, W) images; got shape "
                           f"{tuple(images.shape)}; score samples of the dataset it was trained on")
    model.eval()
    device = next(model.parameters()).device
    feats, probs = [], []
    for x in images.split(batch_size):
        f = model.features(_to_float(x.to(device)))
        feats.append(f.double().cpu())
        probs.append(model.head(f).softmax(1).double().cpu())
    return torch.cat(feats), torch.cat(probs)


def classifier_fid(model, samples, reference, labels=None) -> dict:
    """{"cfid": Fréchet distance of classifier features, plus the samples' class balance and confidence, and with
    the requested labels the classifier's agreement with them}."""
    f_samples, p_samples = classifier_outputs(model, samples)
    return classifier_scores(f_samples, p_samples, classifier_outputs(model, reference)[0], labels)


def classifier_scores(f_samples, p_samples, f_reference, labels=None) -> dict:
    """classifier_fid from the classifier's outputs: features and class probabilities of the samples, features of
    the reference images."""
    out = {"cfid": frechet_distance(f_samples, f_reference), **class_balance(p_samples)}
    if labels is not None:
        out["agreement"] = (p_samples.argmax(1) == labels.cpu()).double().mean().item()
    return out
