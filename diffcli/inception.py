"""Inception-v3 features for FID / KID, computed as the reference TensorFlow code does (via torch-fidelity).

torch-fidelity's `inception-v3-compat` extractor reproduces TF's resize and graph to machine
precision; we only feed it uint8 RGB images and keep its weights offline: they come from torch
hub's cache (where torch-fidelity downloads them) or from a file the user names.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from . import DiffcliError
from .checkpoint import save_atomic
from .data import to_uint8
from .metrics import feature_statistics

log = logging.getLogger("diffcli")
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
FEATURE = "2048"  # the pool3 layer both FID and KID are defined on


def inception_weights(configured: str | None) -> Path:
    """The weights file: `configured` if given, else torch hub's cached copy; a one-line error when neither exists."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if configured:
        file = Path(configured).expanduser()
        if not file.is_file():
            raise DiffcliError(f"metric.inception_weights={configured}: no such file; download {WEIGHTS_URL} there")
        return file
    if cached.is_file():
        return cached
    raise DiffcliError(f"FID/KID need the Inception weights {WEIGHTS_FILE} and none are here: place the file at "
                       f"{cached} (download {WEIGHTS_URL}) or set metric.inception_weights=/path/to/{WEIGHTS_FILE}")


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A state dict read without running code: safetensors, or torch.load with weights_only=True
    (its unpickler builds tensors and containers only, and refuses anything that would call code)."""
    from safetensors.torch import load_file

    try:
        state = load_file(file) if file.suffix == ".safetensors" else \
            torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that asks to run code, a damaged or foreign file
        raise DiffcliError(f"{file} is not a plain weights file ({' '.join(str(e).split())[:160]}); diffcli reads "
                           f"weights without running code: use the original {WEIGHTS_FILE}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DiffcliError(f"{file} does not hold a state dict of tensors; use the original {WEIGHTS_FILE}")
    return state


def load_inception(weights: Path, device: torch.device):
    """torch-fidelity's TF-compatible Inception-v3 with the given weights, in eval mode on `device`.

    torch-fidelity opens a weights file with torch.load(weights_only=False), i.e. full pickle; we
    read the file ourselves (read_weights) and hand it the state dict through the one function it
    would otherwise fetch weights with.
    """
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    state = read_weights(Path(weights))
    try:
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *args, **kwargs: state):
            net = fe.FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE])
    except (RuntimeError, KeyError) as e:  # a file of the wrong kind: say which file, not torch's key list
        raise DiffcliError(f"{weights} is not an Inception-v3 state dict for torch-fidelity "
                           f"({str(e).splitlines()[0][:120]})") from e
    return net.to(device)


@torch.no_grad()
def inception_features(net, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """(N, 2048) float64 pool3 features of images in [-1, 1] (or uint8); grayscale is repeated to RGB."""
    device = next(net.parameters()).device
    out = []
    for batch in images.split(batch_size):
        x = batch if batch.dtype == torch.uint8 else to_uint8(batch)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append(net(x.to(device))[0].double().cpu())
    return torch.cat(out)


def images_fingerprint(images: torch.Tensor) -> str:
    """16 hex digits of sha256 over uint8 pixels: names a reference set in the cache."""
    return hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def reference_features(net, weights: Path, images: torch.Tensor, name: str, cache_dir, batch_size: int = 100):
    """Inception features of real images, cached per dataset, split and content under cache_dir."""
    from safetensors.torch import load_file

    key = f"{name}-{images_fingerprint(images)}-{weights.stat().st_size}"
    file = Path(cache_dir).expanduser() / f"inception-{key}.safetensors"
    if file.is_file():
        log.info("reference Inception features from %s", file)
        return load_file(file)["features"]
    log.info("computing Inception features of %d real images (%s); cached at %s", len(images), name, file)
    features = inception_features(net, images, batch_size)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"features": features}, {"images": str(len(images)), "name": name}, file)
    return features


def fid_kid(sample_features: torch.Tensor, reference: torch.Tensor, names=("fid", "kid"), **kid_args) -> dict:
    """FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) of sample features against reference features
    (those of the two in `names`)."""
    from .metrics import frechet_from_statistics, kid

    out = {}
    if "fid" in names:
        out["fid"] = frechet_from_statistics(feature_statistics(sample_features), feature_statistics(reference))
    return out | (kid(sample_features, reference, **kid_args) if "kid" in names else {})
