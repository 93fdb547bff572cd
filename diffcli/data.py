"""Datasets: 2D toys (diffcli/toys.py) and image sets held on the device as uint8; where a command reads them."""

from __future__ import annotations

import gzip
import inspect
import math
import re
import zipfile
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from diffcli import DiffcliError, short
from diffcli.ranges import MAX_CLASSES
from diffcli.toys import MIXTURES, TOYS, draw_integers, draw_uniform, mixture_modes

def shape_kind(shape) -> str:
    """"images" for a (C, H, W) shape, "points" for a (D,) one: the one place this is asked."""
    return "images" if len(shape) == 3 else "points"


def is_image(data) -> bool:
    """Whether a data set (ToyData, ImageData) holds images: its shape_kind."""
    return shape_kind(data.shape) == "images"


def config_kind(data_cfg) -> str:
    """shape_kind of a data config before its data is built: the 2D toys are points, every other kind images."""
    return "points" if data_cfg.get("kind") == "toy" else "images"


# where a data config's files are: the keys `located` takes from the command, never from a stored config
LOCATION_KEYS = ("root", "path", "download")


def located(stored, given, kind: str):
    """A checkpoint's stored data config with its location keys (root, path, download) replaced by the command's
    `given` ones: a stored config never chooses which files are read, nor whether anything is downloaded. `kind`
    is the model's shape_kind; a 2D toy needs no files and is returned as it is."""
    stored_kind = stored.get("kind")
    if config_kind(stored) != kind:  # e.g. a 2D model whose stored data claims an image folder: read nothing
        raise DiffcliError(f"the checkpoint's model draws {kind} but its stored data.kind={short(stored_kind, 24)} "
                           f"holds {config_kind(stored)}; the checkpoint is damaged or was edited: train it again")
    if stored_kind == "toy":
        return stored
    plain = OmegaConf.to_container(stored, resolve=False) if OmegaConf.is_config(stored) else dict(stored)
    plain |= {key: given.get(key) for key in LOCATION_KEYS}
    if stored_kind in ("npz", "folder") and plain["path"] is None:
        what = "the .npz file" if stored_kind == "npz" else "the image folder"
        raise DiffcliError(f"this model was trained on data.kind={stored_kind} at {short(stored.get('path'))}; "
                           f"real images are read only from this command: give data.path=<{what}>")
    return OmegaConf.create(plain)


def no_labels(name: str) -> DiffcliError:
    """The one-line refusal of a conditional model on data without labels."""
    return DiffcliError(f"data={name} has no class labels, so a conditional model (model.cond=class) cannot be "
                        "trained on it; use model.cond=none, or labelled data (mnist, fashion_mnist, cifar10, "
                        "eight_gaussians, gmm, an npz with 'labels', a folder with one subfolder per class)")


class ToyData:
    """A 2D toy distribution; every batch is a fresh draw from the caller's generator. A mixture's classes are
    its components."""

    shape = (2,)
    is_image = property(is_image)
    class_names = None

    def __init__(self, name, params, device):
        self.name, self.params, self.device = name, dict(params), torch.device(device)
        self.fn = TOYS[name]
        self.modes, self.mode_std = None, None
        if name in MIXTURES:
            modes, self.mode_std = mixture_modes(name, self.params)
            self.modes = modes.to(self.device)
        self.n_classes = 0 if self.modes is None else len(self.modes)

    def sample(self, n, generator):
        """n fresh points (n, 2) on the device."""
        return self.fn(n, generator=generator, device=self.device, **self.params)

    def batch(self, step, batch_size, generator):
        """A training batch; the step is unused because the generator is seeded per step."""
        return self.sample(batch_size, generator)

    def labelled_batch(self, step, batch_size, generator):
        """(x0, the component each point was drawn from) for a conditional model."""
        if not self.n_classes:
            raise no_labels(self.name)
        return self.fn(batch_size, generator=generator, device=self.device, return_labels=True, **self.params)


# ---------------------------------------------------------------------------- images


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] -> float32 [-1, 1], the models' data space."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 pixels (the inverse of to_float, rounded), as they would be saved to PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _epoch_seed(seed, epoch):
    """A well-mixed 63-bit seed from (seed, epoch), so nearby pairs give unrelated permutations."""
    entropy = [int(seed) % 2**64, int(epoch)]  # SeedSequence takes non-negative ints only
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1  # a Python int: NumPy 1.x refuses uint64 >> int


class EpochOrder:
    """The order in which a training set of n items is served: a fresh permutation per epoch, a function of (seed,
    epoch) only, so a resumed run reads what the uninterrupted run read."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perm = n, seed, (None, None)  # (epoch, permutation) of the last epoch used

    def _permutation(self, epoch):
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def indices(self, step, batch_size):
        """Indices of batch `step`: positions step*B .. step*B+B-1 of the epoch stream."""
        n, pos, end, parts = self.n, step * batch_size, (step + 1) * batch_size, []
        while pos < end:  # a batch may straddle one (or, for B > N, several) epoch boundaries
            epoch, offset = divmod(pos, n)
            take = min(n - offset, end - pos)
            parts.append(self._permutation(epoch)[offset : offset + take])
            pos += take
        return torch.cat(parts)


class ImageData:
    """A whole image set as uint8 (N, C, H, W) on the device, served in seeded epoch order."""

    is_image = property(is_image)

    def __init__(self, name, images, labels=None, *, device, seed=0, hflip=False, class_names=None):
        self.name, self.device, self.seed, self.hflip = name, torch.device(device), seed, bool(hflip)
        self.images = images.to(self.device)
        self.labels = None if labels is None else labels.to(torch.int64).to(self.device)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        if self.labels is None:
            self.n_classes = 0
        else:  # the names fix the count (a subset may miss a class); bare integer labels count up to their max
            self.n_classes = len(self.class_names) if self.class_names else int(self.labels.max()) + 1
            if int(self.labels.min()) < 0 or int(self.labels.max()) >= self.n_classes:
                raise DiffcliError(f"{name}: labels must lie in [0, {self.n_classes}); got {int(self.labels.min())}"
                                   f" to {int(self.labels.max())}; fix the labels")
        self.shape = tuple(self.images.shape[1:])
        self.order = EpochOrder(len(self), seed)

    def __len__(self):
        return self.images.shape[0]

    def indices(self, step, batch_size):
        """Dataset indices of batch `step` (EpochOrder)."""
        return self.order.indices(step, batch_size)

    def batch(self, step, batch_size, generator):
        """Batch `step` as float32 in [-1, 1]; a random half mirrored when hflip is on."""
        return self._batch(self.indices(step, batch_size).to(self.device), generator)

    def _batch(self, idx, generator):
        x = to_float(self.images[idx])
        if self.hflip:
            flip = draw_uniform(len(idx), generator, self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def labelled_batch(self, step, batch_size, generator):
        """(batch `step`, its labels), for a conditional model; the same images as `batch`."""
        if self.labels is None:
            raise no_labels(self.name)
        idx = self.indices(step, batch_size).to(self.device)
        return self._batch(idx, generator), self.labels[idx]

    def sample(self, n, generator):
        """n reference images in [-1, 1], chosen at random (without repeats while n <= N)."""
        perm = torch.randperm(len(self), generator=generator, device=generator.device)
        idx = perm[:n] if n <= len(self) else draw_integers(len(self), n, generator, generator.device)
        return to_float(self.images[idx.to(self.device)])


def to_nchw(images, source):
    """uint8 numpy/torch (N, H, W) or (N, H, W, C) -> torch uint8 (N, C, H, W)."""
    images = torch.from_numpy(np.array(images))  # a writable copy; IDX arrays are read-only views
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = images.permute(0, 3, 1, 2)
    if images.shape[0] == 0:
        raise DiffcliError(f"{source} holds no images; point the data config at a non-empty dataset")
    return images.contiguous()


# ---------------------------------------------------------------------------- IDX files

# IDX type byte -> numpy dtype (multi-byte types are big-endian)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Parse an IDX file (plain or .gz) into a numpy array."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DiffcliError(f"cannot read IDX file {path}: {e}; delete it and download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DiffcliError(f"{path} is not an IDX file (bad magic number); delete it and download it again")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4) if len(raw) >= 4 + 4 * ndim else [-1]
    size = int(np.prod(dims)) * dtype.itemsize
    if min(dims, default=0) < 0 or len(raw) != 4 + 4 * ndim + size:
        raise DiffcliError(f"{path} is truncated or corrupt (size does not match its header); download it again")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def _find_idx(raw_dir, stem):
    """The IDX file `stem` in raw_dir, uncompressed preferred, else None."""
    for name in (stem, stem + ".gz"):
        if (raw_dir / name).is_file():
            return raw_dir / name
    return None


def one_line(err):
    """An exception as a single line, for messages that embed it (at most 200 characters)."""
    return short(" ".join(str(err).split()), 200)


def file_label(text) -> str:
    """A name safe inside a cache file's name: a stored data.name must not steer where a file is written."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))[:64]


def _load_idx_dataset(root, split, download, *, folder, title, tv_class):
    """MNIST-format data of one split from <root>/<folder>/raw, downloading via torchvision if asked."""
    raw_dir = root / folder / "raw"
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    files = [_find_idx(raw_dir, s) for s in stems]
    if None not in files:
        return read_idx(files[0]), read_idx(files[1])
    if not download:
        expected = ", ".join(f"{s}[.gz]" for s in stems)
        raise DiffcliError(
            f"{title} {split} split not found in {raw_dir} (expected {expected}); "
            "set data.download=true to download it or data.root=<folder> to point at it"
        )
    import torchvision.datasets as tvd

    try:
        ds = getattr(tvd, tv_class)(str(root), train=split == "train", download=True)
    except (OSError, RuntimeError) as e:
        msg = f"downloading {title} to {root} failed ({one_line(e)}); check the network or set data.root"
        raise DiffcliError(msg) from None
    return ds.data.numpy(), ds.targets.numpy()


def _load_cifar10(root, split, download):
    """CIFAR-10 of one split via torchvision (its .data is (N, 32, 32, 3) uint8)."""
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir() and not download:
        raise DiffcliError(
            f"CIFAR-10 not found in {folder}; set data.download=true to download it or data.root=<folder> to point at it"
        )
    import torchvision.datasets as tvd

    try:
        ds = tvd.CIFAR10(str(root), train=split == "train", download=download)
    except (OSError, RuntimeError) as e:
        fix = ("check the network, or put cifar-10-batches-py under data.root" if download
               else "set data.download=true to fetch it again")
        raise DiffcliError(f"cannot load CIFAR-10 from {folder} ({one_line(e)}); {fix}") from None
    return ds.data, np.asarray(ds.targets)


# the class names of the labelled datasets, in label order
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}

TORCHVISION = {
    "mnist": partial(_load_idx_dataset, folder="MNIST", title="MNIST", tv_class="MNIST"),
    "fashion_mnist": partial(_load_idx_dataset, folder="FashionMNIST", title="Fashion-MNIST", tv_class="FashionMNIST"),
    "cifar10": _load_cifar10,
}


# ---------------------------------------------------------------------------- builders


def _required(cfg, key):
    """cfg[key], or a DiffcliError saying the key must be set (missing, ??? or null)."""
    value = cfg.get(key)
    if value is None:
        raise DiffcliError(f"data.{key} is required for data.kind={cfg.get('kind')}; set data.{key}=<value>")
    return value


def _one_of(cfg, key, choices):
    """cfg[key] checked against the allowed choices."""
    value = _required(cfg, key)
    if value not in choices:
        raise DiffcliError(f"data.{key}={value} is not one of {', '.join(map(str, choices))}; pick one of those")
    return value


def _build_toy(cfg, device, seed):
    """A ToyData from data.name and data.params."""
    name = _one_of(cfg, "name", list(TOYS))
    params = dict(cfg.get("params") or {})
    if OmegaConf.is_config(cfg.get("params")):
        params = OmegaConf.to_container(cfg.params, resolve=True)
    for key, value in params.items():
        numbers = np.asarray(value, dtype=object).ravel() if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            raise DiffcliError(f"data.params.{key}={value!r} must be a number (or a list of numbers) for toy {name}")
    if "return_labels" in params:
        raise DiffcliError(f"data.params.return_labels is not a parameter of toy {name}; labels come with "
                           "model.cond=class")
    signature = inspect.signature(TOYS[name])
    try:  # check the parameter names now rather than in the middle of training
        signature.bind(1, generator=None, device=None, **params)
    except TypeError as e:
        allowed = ", ".join(k for k in signature.parameters if k not in ("n", "generator", "device", "return_labels"))
        raise DiffcliError(f"data.params for toy {name}: {e}; its params are: {allowed}") from None
    data = ToyData(name, params, device)
    probe = data.sample(1000, torch.Generator().manual_seed(seed))
    if not torch.isfinite(probe).all():  # NaN or inf in the data would poison every step
        raise DiffcliError(f"data={name} with params {params} gives points that are not finite (NaN or inf); "
                           "fix data.params")
    return data


def _image_data(cfg, images, labels, device, seed, source, class_names=None):
    """Wrap uint8 images (N, H, W[, C]) and optional labels (and their class names) as ImageData."""
    labels = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64))
    hflip = bool(cfg.get("hflip", False))
    name = str(cfg.get("name", "images"))
    return ImageData(name, to_nchw(images, source), labels, device=device, seed=seed, hflip=hflip,
                     class_names=class_names)


def _build_torchvision(cfg, device, seed):
    """MNIST, Fashion-MNIST or CIFAR-10 from data.root (optionally downloaded)."""
    name = _one_of(cfg, "name", list(TORCHVISION))
    split = _one_of(cfg, "split", ["train", "test"])
    root = Path(str(cfg.get("root") or "~/.cache/diffcli")).expanduser()
    images, labels = TORCHVISION[name](root, split, bool(cfg.get("download", False)))
    return _image_data(cfg, images, labels, device, seed, f"{name} {split} split in {root}", CLASS_NAMES[name])


def _check_npz_images(images, path):
    """Refuse image arrays that are not uint8 (N, H, W) or (N, H, W, C) with C in {1, 3}."""
    channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
    if images.dtype != np.uint8 or not channels_ok:
        raise DiffcliError(
            f"{path}: 'images' is {images.dtype} with shape {images.shape}; expected uint8 (N, H, W) "
            "or (N, H, W, C) with C = 1 or 3 (convert with (x * 255).round().astype(np.uint8))"
        )


# deflate expands at most ~1032-fold: a member claiming more than this per stored byte lies about its size
MAX_DEFLATE_RATIO = 1100


def check_npz_members(path, names=("images", "labels")):
    """Refuse a member whose .npy header claims more bytes than the zip member holds, before numpy allocates them
    (numpy sizes its array from the header alone)."""
    disk = Path(path).stat().st_size
    with zipfile.ZipFile(path) as zf:
        for name in names:
            # numpy reads a key from `<key>` or `<key>.npy`: check whichever it would open
            info = next((zf.getinfo(m) for m in (name, f"{name}.npy") if m in zf.namelist()), None)
            if info is None:
                continue
            ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_DEFLATE_RATIO
            if info.compress_size > disk or info.file_size > info.compress_size * ratio:
                raise ValueError(f"member {name} claims {info.file_size} bytes from {info.compress_size} stored")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
            claimed = math.prod(shape) * dtype.itemsize
            if claimed > info.file_size:
                raise ValueError(f"'{name}' claims shape {short(shape)} of {dtype} ({claimed} bytes) but holds "
                                 f"{info.file_size} bytes")


def _read_npz(path):
    """The images and labels (or None) arrays of an .npz file."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("it holds a single array, not named arrays")
        with z:
            check_npz_members(path)
            arrays = {k: z[k] for k in z.files if k in ("images", "labels")}
            found = z.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # not a zip, pickles, damaged
        msg = f"cannot read {path} as .npz ({one_line(e)}); save it with np.savez(path, images=uint8 array)"
        raise DiffcliError(msg) from None
    if "images" not in arrays:
        found = short(", ".join(found) or "none")
        raise DiffcliError(f"{path} has no 'images' array (found: {found}); save it with np.savez(path, images=...)")
    return arrays["images"], arrays.get("labels")


def _build_npz(cfg, device, seed):
    """Images (and optional labels) from an .npz file."""
    path = Path(str(_required(cfg, "path"))).expanduser()
    if not path.is_file():
        raise DiffcliError(f"npz file {path} not found; set data.path=<file.npz>")
    images, labels = _read_npz(path)
    _check_npz_images(images, path)
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu"):
        raise DiffcliError(
            f"{path}: 'labels' is {labels.dtype} with shape {short(labels.shape)}; "
            f"expected integers of shape ({len(images)},) or no 'labels' key"
        )
    if labels is not None:
        _check_label_range(labels, len(images), path)
    return _image_data(cfg, images, labels, device, seed, str(path))


def _check_label_range(labels, n_images, path):
    """Refuse labels outside 0..K-1 with K at most MAX_CLASSES and the number of images (K = max + 1)."""
    bound = min(MAX_CLASSES, n_images)
    low, high = int(labels.min()), int(labels.max())  # Python ints: a uint64 label does not wrap
    if low < 0 or high >= bound:
        raise DiffcliError(f"{path}: 'labels' run from {short(low, 24)} to {short(high, 24)}; labels are classes "
                           f"0..K-1 with K at most {bound} (no more classes than images, at most 10,000); renumber them")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def read_image(file, mode: str, fix: str = "remove it from the folder or fix it") -> np.ndarray:
    """One image file as uint8 (H, W[, C]) in PIL's `mode` (L or RGB); an unreadable one is one line ending in `fix`."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            return np.asarray(img.convert(mode))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DiffcliError(f"cannot read image {file} ({one_line(e)}); {fix}") from None


def _load_image(file, mode, size):
    """One image file as uint8 (H, W[, C]): short side resized to `size`, centre-cropped."""
    from PIL import Image
    import torchvision.transforms.functional as TF

    img = TF.center_crop(TF.resize(Image.fromarray(read_image(file, mode)), size, antialias=True), [size, size])
    return np.asarray(img)


def _build_folder(cfg, device, seed):
    """Images from a folder (recursive, sorted), resized and centre-cropped to a square."""
    folder = Path(str(_required(cfg, "path"))).expanduser()
    if not folder.is_dir():
        raise DiffcliError(f"image folder {folder} not found; set data.path=<folder of images>")
    size = int(cfg.get("image_size", 32))
    mode = {3: "RGB", 1: "L"}.get(int(cfg.get("channels", 3)))
    if mode is None or size < 1:
        got = f"got channels={cfg.get('channels')}, image_size={size}"
        raise DiffcliError(f"data.channels must be 1 or 3 and data.image_size positive ({got}); fix the data config")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DiffcliError(f"no images ({kinds}) found in {folder}; set data.path to a folder of images")
    images = np.stack([_load_image(f, mode, size) for f in files])
    labels, names = _folder_classes(folder, files)
    return _image_data(cfg, images, labels, device, seed, str(folder), names)


def _folder_classes(folder, files):
    """torchvision's ImageFolder layout: with every image inside a first-level subfolder, the subfolder is its
    class (sorted names); otherwise the folder is unlabelled: (None, None)."""
    parts = [f.relative_to(folder).parts for f in files]
    if any(len(p) < 2 for p in parts):
        return None, None
    names = sorted({p[0] for p in parts})
    # an empty class folder would vanish and shift every later class's label by one
    empty = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in set(names))
    if empty:
        raise DiffcliError(f"class folder {short(folder / empty[0])} holds no images; an empty class would shift "
                           "every later label: add its images or remove the folder")
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64), names


BUILDERS = {"toy": _build_toy, "torchvision": _build_torchvision, "npz": _build_npz, "folder": _build_folder}


def build_data(cfg, device, seed=0):
    """The data object for the `data` config node: ToyData or ImageData."""
    builder = BUILDERS.get(cfg.get("kind"))
    if builder is None:
        raise DiffcliError(f"data.kind={cfg.get('kind')} is not one of {', '.join(BUILDERS)}; pick one of these")
    return builder(cfg, device, seed)
