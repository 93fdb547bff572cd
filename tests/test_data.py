"""Tests for diffcli.data: toys, epoch-ordered image batches, and the dataset readers."""

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffcli import DiffcliError
from diffcli.data import ImageData, build_data, read_idx
from diffcli.toys import TOYS

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = sorted((REPO / "configs" / "data").glob("*.yaml"))
TOY_CONFIGS = [p for p in CONFIGS if OmegaConf.load(p).kind == "toy"]
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder absent")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def cfg(**kw):
    return OmegaConf.create(kw)


# ---------------------------------------------------------------------------- toys


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_shape_and_determinism(name):
    a = TOYS[name](500, generator=gen(1), device="cpu")
    b = TOYS[name](500, generator=gen(1), device="cpu")
    c = TOYS[name](500, generator=gen(2), device="cpu")
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("path", TOY_CONFIGS, ids=lambda p: p.stem)
def test_toy_yaml_params_accepted_and_spread(path):
    node = OmegaConf.load(path)
    x = TOYS[node.name](4000, generator=gen(), device="cpu", **node.params)
    assert x.shape == (4000, 2)
    # roughly unit-ish spread, so one set of training hyperparameters fits every toy
    assert ((x.std(0) > 0.5) & (x.std(0) < 2.5)).all()
    data = build_data(node, "cpu")
    assert data.shape == (2,) and not data.is_image
    assert data.batch(3, 64, gen()).shape == (64, 2)


def test_eight_gaussians_balanced_modes_and_std():
    radius, std = 2.0, 0.1
    data = build_data(cfg(name="eight_gaussians", kind="toy", params={"radius": radius, "std": std}), "cpu")
    angle = 2 * math.pi * torch.arange(8) / 8
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    assert torch.allclose(data.modes, centres, atol=1e-6) and data.mode_std == std
    x = data.sample(16000, gen(3))
    nearest = torch.cdist(x, centres).argmin(1)
    share = torch.bincount(nearest, minlength=8).float() / len(x)
    assert (share - 1 / 8).abs().max() < 0.015
    resid = x - centres[nearest]
    assert abs(resid.std().item() - std) < 0.005


def test_non_mixture_toys_have_no_modes():
    data = build_data(cfg(name="moons", kind="toy", params={}), "cpu")
    assert data.modes is None


def test_checkerboard_on_black_squares():
    scale = 2.0
    x = TOYS["checkerboard"](8000, generator=gen(), device="cpu", scale=scale)
    assert (x.abs() <= scale).all()
    cell = torch.floor((x + scale) / (scale / 2)).long().clamp(0, 3)  # column, row in 0..3
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)
    assert (counts[counts > 0].float() / len(x) - 1 / 8).abs().max() < 0.02 and (counts > 0).sum() == 8


def test_moons_within_box():
    noise, scale = 0.05, 2.0
    x = TOYS["moons"](5000, generator=gen(), device="cpu", noise=noise, scale=scale)
    # make_moons spans [-1, 2] x [-0.5, 1]; centred that is [-1.5, 1.5] x [-0.75, 0.75]
    pad = 5 * noise
    assert (x[:, 0].abs() <= scale * (1.5 + pad)).all() and (x[:, 1].abs() <= scale * (0.75 + pad)).all()
    assert x.mean(0).abs().max() < 0.1
    # undo centring/scaling: each point lies near the unit arc at (0, 0) or the one at (1, 0.5)
    p = x / scale + torch.tensor([0.5, 0.25])
    near_outer = ((p.norm(dim=1) - 1).abs() < 5 * noise) & (p[:, 1] > -5 * noise)
    near_inner = (((p - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs() < 5 * noise) & (p[:, 1] < 0.5 + 5 * noise)
    assert (near_outer | near_inner).all()
    assert abs(near_outer.float().mean().item() - 0.5) < 0.05


def test_bad_toy_params_and_name():
    with pytest.raises(DiffcliError, match="data.params"):
        build_data(cfg(name="moons", kind="toy", params={"sigma": 1.0}), "cpu")
    with pytest.raises(DiffcliError, match="data.name"):
        build_data(cfg(name="spiral", kind="toy", params={}), "cpu")
    with pytest.raises(DiffcliError, match="data.kind"):
        build_data(cfg(name="moons", kind="tabular"), "cpu")


def test_image_yamls_have_hflip_and_ship_defaults():
    for path in CONFIGS:
        node = OmegaConf.load(path)
        assert node.defaults[0]["override /net@_global_.net"] in {"mlp", "unet_small", "unet_ddpm_cifar"}
        assert ("params" in node) == (node.kind == "toy")
        if node.kind != "toy":
            assert node.hflip == (node.name == "cifar10")


# ---------------------------------------------------------------------------- ImageData.batch


def random_images(n, seed=0):
    images = torch.randint(0, 256, (n, 1, 4, 6), generator=gen(seed), dtype=torch.uint8)
    assert not (images == images.flip(-1)).all(dim=(1, 2, 3)).any()  # every image asymmetric
    return images


def to_uint8(x):
    return ((x + 1) * 127.5).round().to(torch.uint8)


def test_batch_range_and_reproducible_from_seed_and_step():
    images = random_images(30)
    a = ImageData("t", images, device="cpu", seed=7, hflip=True)
    b = ImageData("t", images, device="cpu", seed=7, hflip=True)
    for step in range(6):  # walk a through epochs; b jumps straight to step 5
        xa = a.batch(step, 8, gen(100 + step))
    xb = b.batch(5, 8, gen(105))
    assert xa.dtype == torch.float32 and xa.shape == (8, 1, 4, 6)
    assert xa.min() >= -1 and xa.max() <= 1
    assert torch.equal(xa, xb)
    other = ImageData("t", images, device="cpu", seed=8, hflip=True).batch(5, 8, gen(105))
    assert not torch.equal(xa, other)


def test_one_epoch_visits_every_image_once():
    n, bs = 48, 12
    images = (torch.arange(n, dtype=torch.uint8) * 5).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    data = ImageData("t", images, device="cpu", seed=3)
    seen = torch.cat([to_uint8(data.batch(s, bs, gen()))[:, 0, 0, 0] for s in range(n // bs)]) // 5
    assert sorted(seen.tolist()) == list(range(n))
    assert seen.tolist() != list(range(n))  # shuffled


def test_batches_straddle_epochs():
    n, bs = 10, 4  # positions 0..19 in batches of 4: steps 2 and 4 cross epoch boundaries
    images = (torch.arange(n, dtype=torch.uint8) * 20).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    data = ImageData("t", images, device="cpu", seed=0)
    stream = torch.cat([to_uint8(data.batch(s, bs, gen()))[:, 0, 0, 0] // 20 for s in range(5)]).tolist()
    assert sorted(stream[:10]) == list(range(n)) and sorted(stream[10:]) == list(range(n))
    assert stream[:10] != stream[10:]  # each epoch has its own order


def test_hflip_flips_about_half_and_keeps_pixels():
    images = random_images(32)
    data = ImageData("t", images, device="cpu", seed=1, hflip=True)
    x = torch.cat([to_uint8(data.batch(s, 32, gen(s))) for s in range(8)])
    plain = (x[:, None] == images[None]).all(dim=(2, 3, 4))  # (256, 32): output i equals image j
    flipped = (x[:, None] == images.flip(-1)[None]).all(dim=(2, 3, 4))
    assert (plain.sum(1) + flipped.sum(1) == 1).all()  # each output is exactly one image, as is or mirrored
    share = flipped.any(1).float().mean().item()
    assert 0.35 < share < 0.65
    no_flip = ImageData("t", images, device="cpu", seed=1, hflip=False).batch(0, 32, gen())
    assert torch.equal(to_uint8(no_flip), images[ImageData("t", images, device="cpu", seed=1).indices(0, 32)])


def test_sample_returns_distinct_images():
    images = random_images(20)
    data = ImageData("t", images, device="cpu")
    x = data.sample(20, gen(4))
    assert x.shape == (20, 1, 4, 6) and x.min() >= -1 and x.max() <= 1
    match = (to_uint8(x)[:, None] == images[None]).all(dim=(2, 3, 4))
    assert (match.sum(0) == 1).all()
    assert torch.equal(x, data.sample(20, gen(4)))
    assert data.sample(50, gen()).shape == (50, 1, 4, 6)


# ---------------------------------------------------------------------------- IDX / torchvision kind


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, suffix):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / f"x-idx3-ubyte{suffix}", array)
    assert np.array_equal(read_idx(tmp_path / f"x-idx3-ubyte{suffix}"), array)


def test_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(DiffcliError, match="bad"):
        read_idx(tmp_path / "bad")


def test_torchvision_kind_reads_requested_split_only(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    write_idx(raw / "t10k-images-idx3-ubyte", images)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(6))
    node = cfg(name="fashion_mnist", kind="torchvision", root=str(tmp_path), download=False, split="test", hflip=False)
    data = build_data(node, "cpu")
    assert data.shape == (1, 28, 28) and data.labels.tolist() == list(range(6))
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))


@needs_shared
def test_real_mnist_test_split():
    node = cfg(name="mnist", kind="torchvision", root=str(SHARED), download=False, split="test", hflip=False)
    data = build_data(node, "cpu")
    assert len(data) == 10_000 and data.shape == (1, 28, 28) and data.images.dtype == torch.uint8
    counts = torch.bincount(data.labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    with pytest.raises(DiffcliError, match="MNIST train split not found"):
        build_data(cfg(name="mnist", kind="torchvision", root=str(SHARED), download=False, split="train"), "cpu")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_torchvision_missing_without_download(tmp_path, name):
    node = cfg(name=name, kind="torchvision", root=str(tmp_path), download=False, split="train", hflip=False)
    with pytest.raises(DiffcliError) as err:
        build_data(node, "cpu")
    assert str(tmp_path) in str(err.value) and "data.download=true" in str(err.value)
    assert "\n" not in str(err.value)


def test_root_default_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DIFFCLI_DATA", raising=False)
    node = OmegaConf.load(REPO / "configs" / "data" / "mnist.yaml")
    assert node.download is True  # the shipped default; tests never touch the network
    node.download = False
    with pytest.raises(DiffcliError, match=str(tmp_path / ".cache" / "diffcli" / "MNIST" / "raw")):
        build_data(node, "cpu")


# ---------------------------------------------------------------------------- npz


def test_npz_layouts(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (4, 8, 6), dtype=np.uint8)
    rgb = np.random.default_rng(1).integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", images=gray, labels=np.arange(4))
    np.savez(tmp_path / "rgb.npz", images=rgb)
    g = build_data(cfg(name="npz", kind="npz", path=str(tmp_path / "gray.npz")), "cpu")
    r = build_data(cfg(name="npz", kind="npz", path=str(tmp_path / "rgb.npz")), "cpu")
    assert g.shape == (1, 8, 6) and torch.equal(g.images[:, 0], torch.from_numpy(gray))
    assert g.labels.tolist() == [0, 1, 2, 3] and r.labels is None
    assert r.shape == (3, 8, 6) and torch.equal(r.images[2, 1], torch.from_numpy(rgb[2, :, :, 1]))


@needs_shared
def test_npz_shared_cifar_subset():
    data = build_data(cfg(name="cifar10", kind="npz", path=str(SHARED / "cifar10_test_subset.npz"), hflip=True), "cpu")
    assert len(data) == 846 and data.shape == (3, 32, 32) and data.hflip
    assert data.batch(0, 16, gen()).shape == (16, 3, 32, 32)


def test_npz_errors(tmp_path):
    def load(path):
        return build_data(cfg(name="npz", kind="npz", path=str(path)), "cpu")

    with pytest.raises(DiffcliError, match="not found"):
        load(tmp_path / "nope.npz")
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DiffcliError, match="no 'images'.*pixels"):
        load(tmp_path / "nokey.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DiffcliError, match="float32.*expected uint8"):
        load(tmp_path / "float.npz")
    np.savez(tmp_path / "ndim.npz", images=np.zeros((4, 4), np.uint8))
    with pytest.raises(DiffcliError, match=r"shape \(4, 4\)"):
        load(tmp_path / "ndim.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DiffcliError, match="junk.npz"):
        load(tmp_path / "junk.npz")
    with pytest.raises(DiffcliError, match="data.path is required"):
        build_data(OmegaConf.load(REPO / "configs" / "data" / "npz.yaml"), "cpu")


# ---------------------------------------------------------------------------- folder


def test_folder_loads_resized_crops(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 16), dtype=np.uint8)).save(tmp_path / "sub" / "b.PNG")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "c.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    rgb = build_data(cfg(name="folder", kind="folder", path=str(tmp_path), image_size=16, channels=3), "cpu")
    gray = build_data(cfg(name="folder", kind="folder", path=str(tmp_path), image_size=8, channels=1), "cpu")
    assert len(rgb) == 3 and rgb.shape == (3, 16, 16) and gray.shape == (1, 8, 8)
    # b.PNG is exactly 16 wide: resizing its short side to 16 is the identity, the crop takes rows 7..22
    b = np.asarray(Image.open(tmp_path / "sub" / "b.PNG").convert("RGB"))[7:23]
    assert torch.equal(rgb.images[2], torch.from_numpy(b.copy()).permute(2, 0, 1))


def test_folder_errors(tmp_path):
    def load(path):
        return build_data(cfg(name="folder", kind="folder", path=str(path)), "cpu")

    with pytest.raises(DiffcliError, match="not found"):
        load(tmp_path / "missing")
    with pytest.raises(DiffcliError, match="no images"):
        load(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DiffcliError, match="broken.png"):
        load(tmp_path)


def test_folder_refuses_an_empty_class_folder(tmp_path):
    """One subfolder per class: an empty one would vanish and shift every later label, so it is refused by name."""
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "x.png")
    data = build_data(cfg(name="folder", kind="folder", path=str(tmp_path), image_size=8, channels=1), "cpu")
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 1]
    (tmp_path / "bird").mkdir()  # sorts first: without the check, cat and dog would silently become 0 and 1 of 3
    with pytest.raises(DiffcliError, match=r"class folder .*bird holds no images") as e:
        build_data(cfg(name="folder", kind="folder", path=str(tmp_path), image_size=8, channels=1), "cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("labels, bound", [([0, 1, -1, 2], 4), ([0, 1, 2, 4], 4), ([0, 2**40, 1, 1], 4),
                                           ([0, 1, 2, 2**64 - 1], 4)])
def test_npz_labels_are_bounded_before_any_allocation(tmp_path, labels, bound):
    """A label value sizes the class embedding (n_classes = max + 1): at most the number of images (and 10,000)."""
    dtype = np.uint64 if max(labels) >= 2**63 else np.int64
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array(labels, dtype=dtype))
    with pytest.raises(DiffcliError, match=rf"'labels' run from .*K at most {bound}"):
        build_data(cfg(name="npz", kind="npz", path=str(tmp_path / "x.npz")), "cpu")


def test_npz_labels_up_to_the_image_count_are_accepted(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([3, 0, 0, 0]))
    assert build_data(cfg(name="npz", kind="npz", path=str(tmp_path / "x.npz")), "cpu").n_classes == 4


def _lying_npz(file, shape, compress=False):
    """An npz whose images.npy header claims `shape` but holds only 64 bytes of pixels."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr("images.npy", header.getvalue() + bytes(64))


@pytest.mark.parametrize("compress", [False, True])
def test_npz_header_claiming_more_than_the_member_holds_is_refused_unread(tmp_path, monkeypatch, compress):
    """A header of 10^12 pixels over 64 bytes: refused from the header and the member size, before numpy allocates."""
    _lying_npz(tmp_path / "x.npz", (10**6, 1000, 1000), compress)
    with monkeypatch.context() as m, \
            pytest.raises(DiffcliError, match=r"cannot read .*x.npz as .npz \('images' claims shape"):
        m.setattr(np.lib.format, "read_array", lambda *a, **k: pytest.fail("numpy was asked to allocate"))
        build_data(cfg(name="npz", kind="npz", path=str(tmp_path / "x.npz")), "cpu")
    _lying_npz(tmp_path / "ok.npz", (1, 8, 8), compress)  # the same layout, honest: read
    assert build_data(cfg(name="npz", kind="npz", path=str(tmp_path / "ok.npz")), "cpu").shape == (1, 8, 8)


def test_npz_member_claiming_an_impossible_expansion_is_refused(tmp_path):
    """The zip's own size fields are checked too: 64 stored bytes cannot hold a 1 GB member."""
    import zipfile

    _lying_npz(tmp_path / "x.npz", (1, 8, 8))
    raw = bytearray((tmp_path / "x.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "x.npz") as z:
        info = z.getinfo("images.npy")
    central = raw.rindex(b"PK\x01\x02")  # the central directory entry's uncompressed size at offset 24
    raw[central + 24:central + 28] = (2**30).to_bytes(4, "little")
    (tmp_path / "x.npz").write_bytes(bytes(raw))
    assert info.file_size < 2**30
    with pytest.raises(DiffcliError, match="claims 1073741824 bytes"):
        build_data(cfg(name="npz", kind="npz", path=str(tmp_path / "x.npz")), "cpu")


def test_mixture_table_matches_the_closed_forms():
    """data.MIXTURES (the one description of the mixture toys) against hand-written closed forms: eight_gaussians'
    centres radius (cos, sin)(2 pi k / 8) and std; gmm's representative std, the largest 2x2 eigenvalue
    (a + d)/2 + sqrt(((a - d)/2)^2 + b^2), square-rooted; the mixture density log sum_k w_k N(x; mu_k, S_k) by scipy."""
    import math

    import numpy as np
    from omegaconf import OmegaConf
    from scipy.stats import multivariate_normal

    from diffcli.toys import GMM_COVS, GMM_MEANS, mixture_distribution, mixture_modes

    modes, std = mixture_modes("eight_gaussians", {"radius": 3.0, "std": 0.25})
    angle = [2 * math.pi * k / 8 for k in range(8)]
    want = torch.tensor([[3 * math.cos(a), 3 * math.sin(a)] for a in angle])
    torch.testing.assert_close(modes, want, rtol=0, atol=1e-6)
    assert std == pytest.approx(0.25, rel=1e-12)

    _, std = mixture_modes("gmm", {})
    top = max((a + d) / 2 + math.sqrt(((a - d) / 2) ** 2 + b**2) for (a, b), (_, d) in GMM_COVS)
    assert std == pytest.approx(math.sqrt(top), rel=1e-12)

    x = torch.tensor([[0.1, -0.3], [1.7, 0.2], [-2.0, 2.5]], dtype=torch.float64)
    got = mixture_distribution(OmegaConf.create({"kind": "toy", "name": "gmm", "params": {}})).log_prob(x)
    density = sum(multivariate_normal(m, c).pdf(x.numpy()) / 3 for m, c in zip(GMM_MEANS, GMM_COVS))
    np.testing.assert_allclose(got.numpy(), np.log(density), rtol=1e-12)
    assert mixture_distribution(OmegaConf.create({"kind": "toy", "name": "moons"})) is None
