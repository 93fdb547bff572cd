"""Class-conditional training and sampling through the real config path: labels from the data, label dropout,
the checkpoint's classes, label=/labels=/guidance= at sampling, samples.npz labels, agreement in eval."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_config
from diffcli import DiffcliError
from diffcli.checkpoint import find_ema, load_ema
from diffcli.data import ImageData, build_data
from diffcli.toys import eight_gaussians_modes
from diffcli.evaluate import run_eval
from diffcli.summary import summarize
from diffcli.sample import run_sample
from diffcli.train import run_train
from diffcli.training import drop_labels

TOY = ["data=eight_gaussians", "model=flow", "net=mlp", "train=toy", "model.cond=class", "train.sample_every=0",
       "train.eval_every=0", "device=cpu"]


def test_toy_labels_are_the_components_and_the_points_are_those_of_batch():
    data = build_data(compose_config("train", ["data=eight_gaussians"]).data, "cpu")
    x, y = data.labelled_batch(0, 4000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, data.batch(0, 4000, torch.Generator().manual_seed(1)))
    modes, _ = eight_gaussians_modes()
    assert (torch.cdist(x, modes).argmin(1) == y).all() and data.n_classes == 8
    assert torch.bincount(y, minlength=8).min() > 400


def test_image_labels_follow_the_epoch_order():
    images = torch.arange(10, dtype=torch.uint8).repeat_interleave(4).reshape(10, 1, 2, 2)
    data = ImageData("t", images, torch.arange(10) % 3, device="cpu", seed=5, class_names=["a", "b", "c"])
    for step in range(4):
        x, y = data.labelled_batch(step, 4, None)
        torch.testing.assert_close(x, data.batch(step, 4, None))
        assert ((x[:, 0, 0, 0] + 1) * 127.5).round().long().remainder(3).tolist() == y.tolist()
    assert data.n_classes == 3 and data.class_names == ["a", "b", "c"]
    with pytest.raises(DiffcliError, match="labels must lie"):
        ImageData("t", images, torch.arange(10), device="cpu", class_names=["a", "b"])


def test_folder_with_one_subfolder_per_class_is_labelled(tmp_path):
    from PIL import Image

    for cls, shade in (("cats", 40), ("dogs", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), shade + i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = compose_config("train", ["data=folder", f"data.path={tmp_path}", "data.image_size=8", "data.channels=1"])
    data = build_data(cfg.data, "cpu")
    assert data.class_names == ["cats", "dogs"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert (data.images[:3] < 100).all() and (data.images[3:] > 100).all()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "loose.png")  # not in a class folder: unlabelled
    assert build_data(cfg.data, "cpu").labels is None


def test_label_dropout_rate_and_null_class():
    y = torch.zeros(100000, dtype=torch.long)
    dropped = drop_labels(y, 10, 0.1, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10} and abs((dropped == 10).double().mean().item() - 0.1) < 0.005
    assert (drop_labels(y, 10, 0.0, torch.Generator()) == 0).all()


def test_unlabelled_data_refuses_a_conditional_model(tmp_path):
    cfg = compose_config("train", ["data=moons", "model=flow", "net=mlp", "train=toy", "model.cond=class",
                                   "train.steps=2", "device=cpu"])
    with pytest.raises(DiffcliError, match="moons has no class labels"):
        run_train(cfg, tmp_path)


@pytest.fixture(scope="module")
def conditional_toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond")
    run_train(compose_config("train", TOY + ["train.steps=1500"]), out)
    return out


def test_checkpoint_records_the_classes(conditional_toy):
    _, cfg, _, _ = load_ema(find_ema(str(conditional_toy)))
    assert cfg.model.cond == "class" and cfg.model.n_classes == 8


def test_sampling_a_class_puts_the_samples_in_its_mode(conditional_toy, tmp_path):
    out = run_sample(compose_config("sample", [f"ckpt={conditional_toy}", "label=3", "n=400", "steps=40",
                                               "device=cpu"]), tmp_path)
    modes, _ = eight_gaussians_modes()
    share = (torch.cdist(out.samples, modes).argmin(1) == 3).double().mean().item()
    assert share > 0.9, share
    saved = np.load(tmp_path / "samples.npz")
    assert (saved["labels"] == 3).all() and len(saved["labels"]) == 400


def test_eval_reports_agreement_rising_with_guidance(conditional_toy, tmp_path):
    agreement = []
    for w in (0.0, 1.0, 3.0):
        record = run_eval(compose_config("eval", [f"ckpt={conditional_toy}", f"guidance={w}", "n=800", "steps=40",
                                                  "device=cpu"]), tmp_path / str(w))
        agreement.append(record["metrics"]["agreement"])
        assert record["guidance"] == w and record["labels"] == list(range(8))
    assert agreement[0] < 0.3 and agreement[1] > 0.9 and agreement[2] >= agreement[1] - 0.01, agreement
    summary = summarize(tmp_path)  # a sweep over guidance= gets its quality-vs-w plot
    assert [r["guidance"] for r in summary["rows"]] == [0.0, 1.0, 3.0]
    assert Path(summary["guidance_plot"]).stat().st_size > 10000


def test_bad_requests_are_one_line(conditional_toy, tmp_path):
    with pytest.raises(DiffcliError, match="class 9 does not exist"):
        run_sample(compose_config("sample", [f"ckpt={conditional_toy}", "label=9", "n=4", "device=cpu"]), tmp_path)
    with pytest.raises(DiffcliError, match="not both"):
        run_sample(compose_config("sample", [f"ckpt={conditional_toy}", "label=1", "labels=[2]", "n=4"]), tmp_path)
