"""A checkpoint's stored data config never chooses what `sample` or `eval` read or fetch (issue 27): sample reads no
data files, eval reads real images only from the command's data.root / data.path, and nothing downloads because a
file said so. Every file opened or folder listed during a command is recorded by an audit hook, an independent
witness of what was read."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import compose_config
from diffcli import DiffcliError
from diffcli.data import located
from diffcli.evaluate import run_eval
from diffcli.sample import run_sample
from diffcli.train import run_train

_TOUCHED: list[str] | None = None  # paths opened or listed while a `watch` is active


def _audit(event, args):
    if _TOUCHED is not None and event in ("open", "os.scandir", "os.listdir") and args and args[0] is not None:
        _TOUCHED.append(str(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed: it records only inside `watch`


def watch(fn, *args):
    """(fn(*args), every path opened or listed meanwhile); an exception is returned in place of the result."""
    global _TOUCHED
    _TOUCHED = []
    try:
        out = fn(*args)
    except DiffcliError as e:
        out = e
    finally:
        touched, _TOUCHED = _TOUCHED, None
    return out, touched


def under(paths, folder) -> list[str]:
    """The paths that lie in `folder`."""
    return [p for p in paths if p.startswith(str(folder))]


def _classes(folder, seed=0):
    """An image folder of two classes, four 8x8 grayscale images each."""
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


TINY_UNET = ["net.ch=8", "net.ch_mult=[1]", "train.steps=1", "train.batch_size=4", "train.sample_every=0",
             "train.eval_every=0", "model=flow", "device=cpu"]
EVAL = ["sampler=euler", "steps=2", "n=8", "metric=cfid", "metric.classifier_epochs=1", "device=cpu"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A one-step U-Net trained on an image folder (its stored data.path) and a copy of that folder elsewhere."""
    root = tmp_path_factory.mktemp("locations")
    stored = _classes(root / "stored")
    run_train(compose_config("train", ["data=folder", f"data.path={stored}", "data.image_size=8", "data.channels=1",
                                       *TINY_UNET]), root / "run")
    shutil.copytree(stored, root / "given")
    return root


def _edit_stored_data(run, dest, data: dict):
    """A copy of `run` whose checkpoint's stored data config is `data`."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".diffcli.lock"))
    for file in (dest / "checkpoints").glob("ema_*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
        config["data"] = data
        meta["config"] = json.dumps(config)
        save_file(tensors, str(file), metadata=meta)
    return dest


def test_sample_never_reads_the_stored_image_folder(folder_run, tmp_path):
    out, touched = watch(run_sample, compose_config("sample", [f"ckpt={folder_run / 'run'}", "n=4", "steps=2",
                                                               "device=cpu"]), tmp_path / "s")
    assert not isinstance(out, Exception) and (tmp_path / "s" / "samples.npz").is_file()
    assert under(touched, folder_run / "stored") == [] and under(touched, folder_run / "run")  # the witness works


def test_sample_of_a_2d_model_whose_stored_data_names_a_folder_reads_nothing(folder_run, tmp_path):
    """A 2D model gets reference points only from a synthetic toy; a stored folder is neither walked nor opened."""
    run_train(compose_config("train", ["data=moons", "train.steps=2", "train.sample_every=0", "device=cpu"]),
              tmp_path / "toy")
    edited = _edit_stored_data(tmp_path / "toy", tmp_path / "edited",
                               {"name": "folder", "kind": "folder", "path": str(folder_run / "stored")})
    out, touched = watch(run_sample, compose_config("sample", [f"ckpt={edited}", "n=16", "steps=2", "device=cpu"]),
                         tmp_path / "s")
    assert not isinstance(out, Exception) and (tmp_path / "s" / "samples.png").is_file()
    assert under(touched, folder_run / "stored") == []
    out, touched = watch(run_sample, compose_config("sample", [f"ckpt={edited}", "n=16", "steps=2", "device=cpu",
                                                               "sample.plot_field=true"]), tmp_path / "f")
    assert isinstance(out, DiffcliError) and "stored data.kind=folder is not a toy" in str(out)
    assert under(touched, folder_run / "stored") == [] and not (tmp_path / "f").exists()
    out, touched = watch(run_eval, compose_config("eval", [f"ckpt={edited}", "n=16", "steps=2", "device=cpu"]),
                         tmp_path / "e")
    assert isinstance(out, DiffcliError) and "draws points but its stored data.kind=folder" in str(out)
    assert under(touched, folder_run / "stored") == []


def test_eval_without_data_path_names_the_stored_folder_and_reads_nothing(folder_run, tmp_path):
    out, touched = watch(run_eval, compose_config("eval", [f"ckpt={folder_run / 'run'}", *EVAL,
                                                           f"metric.cache_dir={tmp_path}"]), tmp_path / "e")
    assert isinstance(out, DiffcliError) and "give data.path=<the image folder>" in str(out)
    assert str(folder_run / "stored") in str(out) and "\n" not in str(out)
    assert under(touched, folder_run / "stored") == [] and not (tmp_path / "e").exists()


def test_eval_reads_the_folder_the_command_gives_and_only_that(folder_run, tmp_path):
    args = [f"ckpt={folder_run / 'run'}", *EVAL, f"metric.cache_dir={tmp_path / 'cache'}"]
    out, touched = watch(run_eval, compose_config("eval", [*args, f"data.path={folder_run / 'given'}"]),
                         tmp_path / "e")
    assert not isinstance(out, Exception) and out["metrics"]["cfid"] >= 0
    assert under(touched, folder_run / "stored") == [] and len(under(touched, folder_run / "given")) >= 8
    # a path that does not exist is an error about that path, never a fallback to the stored one
    out, touched = watch(run_eval, compose_config("eval", [*args, f"data.path={tmp_path / 'nowhere'}"]),
                         tmp_path / "e2")
    assert isinstance(out, DiffcliError) and "nowhere not found" in str(out)
    assert under(touched, folder_run / "stored") == []


def test_a_stored_download_and_root_never_fetch_nor_create_folders(folder_run, tmp_path, monkeypatch):
    """A stored torchvision config with download=true and its own root: eval looks only in the command's data.root,
    downloads nothing (download=false unless the command says so) and creates no folder; sample does not look."""
    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "download_url", lambda *a, **k: pytest.fail("a download was attempted"))
    planted = tmp_path / "planted"
    edited = _edit_stored_data(folder_run / "run", tmp_path / "edited",
                               {"name": "mnist", "kind": "torchvision", "root": str(planted), "download": True})
    out, _ = watch(run_sample, compose_config("sample", [f"ckpt={edited}", "n=2", "steps=2", "device=cpu"]),
                   tmp_path / "s")
    assert not isinstance(out, Exception) and not planted.exists()
    given = tmp_path / "given_root"
    given.mkdir()
    out, touched = watch(run_eval, compose_config("eval", [f"ckpt={edited}", *EVAL, f"metric.cache_dir={tmp_path}",
                                                           f"data.root={given}"]), tmp_path / "e")
    assert isinstance(out, DiffcliError) and f"not found in {given}" in str(out) and "data.download=true" in str(out)
    assert not planted.exists() and under(touched, planted) == [] and list(given.iterdir()) == []


def test_located_takes_root_path_and_download_from_the_command_only():
    stored = {"name": "mnist", "kind": "torchvision", "root": "/planted", "download": True, "split": "test"}
    data = located(stored, {"root": "/mine", "path": None, "download": False}, "images")
    assert dict(data) == {"name": "mnist", "kind": "torchvision", "root": "/mine", "download": False,
                          "split": "test", "path": None}
    toy = {"name": "moons", "kind": "toy", "params": {}, "path": "/"}
    assert located(toy, {"root": "/mine", "path": None, "download": True}, "points") is toy  # no files: as stored
    with pytest.raises(DiffcliError, match=r"at /x{76}\.\.\.; real images .* give data.path=<the .npz file>"):
        located({"name": "npz", "kind": "npz", "path": "/" + "x" * 500}, {"root": "r", "path": None}, "images")
    with pytest.raises(DiffcliError, match="draws images but its stored data.kind=toy holds points"):
        located(toy, {"root": "r", "path": None}, "images")


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    """A one-step U-Net trained on a labelled .npz of 8x8 grayscale images."""
    root = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    np.savez(root / "x.npz", images=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), labels=np.arange(24) % 3)
    run_train(compose_config("train", ["data=npz", f"data.path={root / 'x.npz'}", *TINY_UNET]), root / "run")
    return root


def test_eval_of_an_npz_model_with_its_npz_gives_the_direct_metrics(npz_run, tmp_path):
    """data.path=<the npz it was trained on>: classifier-FID equal to classifier_fid on the same samples and images."""
    from diffcli.cfid import classifier_for, classifier_outputs, classifier_scores
    from diffcli.data import to_float
    from diffcli.loading import load_model
    from diffcli.sampling import draw

    args = [f"ckpt={npz_run / 'run'}", *EVAL, f"metric.cache_dir={tmp_path}", f"data.path={npz_run / 'x.npz'}"]
    record = run_eval(compose_config("eval", args), tmp_path / "e")
    cfg = compose_config("eval", args)
    model = load_model(cfg.ckpt, torch.device("cpu"))
    samples = draw(cfg, model, torch.device("cpu")).samples
    data_cfg = {**model.config.data, "path": str(npz_run / "x.npz")}
    classifier, info = classifier_for(data_cfg, cache_dir=tmp_path, device="cpu", epochs=1)
    images = torch.from_numpy(np.load(npz_run / "x.npz")["images"])[:, None]
    f, p = classifier_outputs(classifier, samples)
    direct = classifier_scores(f, p, classifier_outputs(classifier, to_float(images))[0])
    assert record["metrics"]["cfid"] == pytest.approx(direct["cfid"], rel=1e-6)
    assert record["metrics"]["classifier_accuracy"] == info["accuracy"]


def test_the_real_command_refuses_in_one_line_and_fetches_nothing(folder_run, tmp_path):
    """Through `diffcli eval`: a stored download=true with a planted root, and no data.path: one line, exit 2, no
    folder created (the planted root nor the run's)."""
    from conftest import run_cli

    planted = tmp_path / "planted"
    edited = _edit_stored_data(folder_run / "run", tmp_path / "edited",
                               {"name": "folder", "kind": "folder", "path": str(folder_run / "stored"),
                                "root": str(planted), "download": True})
    r = run_cli("eval", f"ckpt={edited}", *EVAL, f"metric.cache_dir={tmp_path / 'cache'}", "hydra.run.dir=out",
                cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("diffcli: error: this model was trained on data.kind=folder at ")
    assert "give data.path=<the image folder>" in r.stderr
    assert not planted.exists() and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
