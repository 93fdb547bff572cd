"""`diffcli edit` (diffcli/edit.py, diffcli/inputs.py) on exact models (net=oracle: no training): every task end to
end, against what each must return (the input itself, `diffcli sample`'s samples, the round trip), and its errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config, run_cli
from diffcli import DiffcliError
from diffcli.edit import run_edit
from diffcli.train import run_train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Exact flow models of 48 gray and 48 RGB 8x8 'images' (their npz files beside), a 2D mixture (flow and DDPM)
    and eight Gaussians under a uniform-prior flow."""
    tmp = tmp_path_factory.mktemp("edit")
    g = np.random.default_rng(0)
    gray = np.clip(g.normal(128, 60, (48, 1, 1)) + g.normal(0, 20, (48, 8, 8)), 0, 255).astype(np.uint8)
    rgb = np.clip(g.normal(128, 60, (48, 1, 1, 3)) + g.normal(0, 20, (48, 8, 8, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp / "gray.npz", images=gray)
    np.savez(tmp / "rgb.npz", images=rgb)
    for name, args in {"gray": ["data=npz", f"data.path={tmp / 'gray.npz'}", "model=flow"],
                       "rgb": ["data=npz", f"data.path={tmp / 'rgb.npz'}", "model=flow"],
                       "gmm": ["data=gmm", "model=flow"], "gmm_ddpm": ["data=gmm", "model=ddpm"],
                       "gmm_uniform": ["data=eight_gaussians", "model=flow", "model.prior=uniform"]}.items():
        run_train(compose_config("train", [*args, "net=oracle", "device=cpu"]), tmp / name)
    return tmp


def edit(models, out, *args):
    return run_edit(compose_config("edit", [*args, "device=cpu"]), out)


def test_inpainting_points_keeps_the_known_coordinates(models, tmp_path):
    """NaN marks the unknown coordinate of each point: the results keep the known one exactly and fill the other
    (finite); edited.npz holds inputs, masks and results, and edited.png is drawn."""
    pts = np.random.default_rng(1).normal(size=(60, 2)).astype(np.float32)
    pts[:30, 1], pts[30:, 0] = np.nan, np.nan
    np.save(tmp_path / "pts.npy", pts)
    for method in ("replace", "repaint", "dps"):
        out = edit(models, tmp_path / method, f"ckpt={models / 'gmm_ddpm'}", f"input={tmp_path / 'pts.npy'}",
                   f"method={method}", "steps=20", "jump_n_sample=2")
        known = ~np.isnan(pts)
        if method != "dps":  # DPS only steers towards y: it keeps no coordinate exactly
            assert np.array_equal(out["results"].numpy()[known], pts[known])
        assert torch.isfinite(out["results"]).all() and torch.equal(out["masks"], torch.from_numpy(known))
        with np.load(tmp_path / method / "edited.npz") as z:
            assert {"inputs", "masks", "results", "nfe"} <= set(z.files)
        assert (tmp_path / method / "edited.png").stat().st_size > 1000


def test_inpainting_images_with_each_mask(models, tmp_path):
    """A half, a rectangle and a mask image (white: fill): outside the mask the results are the inputs exactly."""
    h = w = 8
    white = np.zeros((h, w), np.uint8)
    white[2:5, 1:7] = 255
    Image.fromarray(white).save(tmp_path / "mask.png")
    expected = {"bottom": np.broadcast_to(np.arange(h)[:, None] >= 4, (h, w)), "[1,2,7,5]": white > 0,
                str(tmp_path / "mask.png"): white > 0}
    for spec, hidden in expected.items():
        out = edit(models, tmp_path / str(len(spec)), f"ckpt={models / 'gray'}", f"input={models / 'gray.npz'}",
                   "n=6", "steps=10", f"mask={spec}")
        x, y = out["inputs"].numpy(), out["results"].numpy()
        assert np.array_equal(y[:, :, ~hidden], x[:, :, ~hidden]) and not np.allclose(y[:, :, hidden], 0)
        assert np.array_equal(out["masks"].numpy()[0, 0], ~hidden)


def test_sdedit_strength_one_is_diffcli_sample_and_zero_the_input(models, tmp_path):
    """strength=1 on a flow (alpha(1) = 0) draws exactly `diffcli sample`'s samples of the same seed; strength=0
    returns the inputs unchanged."""
    from diffcli.sample import run_sample

    common = [f"ckpt={models / 'gray'}", "steps=12", "sampler=euler", "seed=3", "device=cpu"]
    out = edit(models, tmp_path / "e1", *common, f"input={models / 'gray.npz'}", "n=10", "task=sdedit", "strength=1")
    drawn = run_sample(compose_config("sample", [*common, "n=10"]), tmp_path / "s")
    assert torch.allclose(out["results"], drawn.samples, atol=1e-6, rtol=0)
    out = edit(models, tmp_path / "e0", *common, f"input={models / 'gray.npz'}", "n=10", "task=sdedit", "strength=0")
    assert torch.equal(out["results"], out["inputs"])


def test_sdedit_strength_one_on_a_diffusion_is_diffcli_sample_too(models, tmp_path):
    """On the DDPM path alpha(1) = 0.006 is not 0: strength=1 still forgets the input and draws `sample`'s samples
    on the sampler's whole grid (DDIM's leading grid starts below t = 1)."""
    from diffcli.sample import run_sample

    pts = np.random.default_rng(2).normal(size=(20, 2)).astype(np.float32)
    np.save(tmp_path / "pts.npy", pts)
    common = [f"ckpt={models / 'gmm_ddpm'}", "sampler=ddim", "steps=10", "seed=5", "device=cpu"]
    out = edit(models, tmp_path / "e", *common, f"input={tmp_path / 'pts.npy'}", "task=sdedit", "strength=1")
    drawn = run_sample(compose_config("sample", [*common, "n=20"]), tmp_path / "s")
    assert torch.allclose(out["results"], drawn.samples, atol=1e-6, rtol=0)


def test_a_class_label_conditions_the_edit(models, tmp_path):
    """The exact mixture oracle knows its components as classes: with x[1] = -0.5 known (both lower components'
    mean height), label=0 completes x[0] around component 0's -1.2 and label=1 around component 1's 1.8."""
    pts = np.full((400, 2), np.nan, np.float32)
    pts[:, 1] = -0.5
    np.save(tmp_path / "pts.npy", pts)
    for label, mean in ((0, -1.2), (1, 1.8)):
        out = edit(models, tmp_path / str(label), f"ckpt={models / 'gmm'}", f"input={tmp_path / 'pts.npy'}",
                   f"label={label}", "steps=50")
        assert abs(out["results"][:, 0].mean().item() - mean) < 0.15, (label, out["results"][:, 0].mean())


def test_encode_then_decode_returns_the_inputs(models, tmp_path):
    """task=encode writes the noise and its round-trip error; task=decode of that file returns the inputs, to the
    error encode reported (Heun, 40 steps, the exact model)."""
    common = [f"ckpt={models / 'gray'}", "sampler=heun", "steps=40"]
    enc = edit(models, tmp_path / "enc", *common, f"input={models / 'gray.npz'}", "n=8", "task=encode")
    assert enc["round_trip_error"].max() < 0.05
    assert (enc["results"] - enc["inputs"]).abs().max() > 0.3  # carried to t = 1, not left where it was
    dec = edit(models, tmp_path / "dec", *common, f"input={tmp_path / 'enc' / 'edited.npz'}", "task=decode")
    err = (dec["results"] - enc["inputs"]).flatten(1).abs().max(1).values
    assert torch.allclose(err, enc["round_trip_error"], atol=1e-5)


def test_interpolation_ends_at_each_pair(models, tmp_path):
    """Pairs (1st, 2nd), (3rd, 4th): frames (pairs, frames, C, H, W) whose ends are the pair, to the round trip."""
    out = edit(models, tmp_path, f"ckpt={models / 'gray'}", f"input={models / 'gray.npz'}", "n=4", "sampler=heun",
               "steps=40", "task=interpolate", "frames=5")
    x, frames = out["inputs"], out["results"]
    assert frames.shape == (2, 5, 1, 8, 8)
    assert (frames[:, 0] - x[0::2]).abs().max() < 0.05 and (frames[:, -1] - x[1::2]).abs().max() < 0.05


def test_colorize_keeps_the_gray_and_dps_measures(models, tmp_path):
    """colorize of gray PNGs: the luminance of the result is the input's; dps down2 writes y = A x + sigma_y n,
    and the result's block means are closer to y than the prior's."""
    from diffcli.editing import LUMA_BASIS

    folder = tmp_path / "pngs"
    folder.mkdir()
    with np.load(models / "rgb.npz") as z:
        for i, image in enumerate(z["images"][:4]):
            Image.fromarray(image).convert("L").save(folder / f"{i}.png")
    out = edit(models, tmp_path / "c", f"ckpt={models / 'rgb'}", f"input={folder}", "task=colorize", "steps=10")
    luma = lambda x: torch.einsum("bi...,ij->bj...", x.double(), LUMA_BASIS)[:, 0]  # noqa: E731
    assert (luma(out["results"]) - luma(out["inputs"])).abs().max() < 1e-5
    out = edit(models, tmp_path / "d", f"ckpt={models / 'gray'}", f"input={models / 'gray.npz'}", "n=6",
               "task=dps", "operator=down2", "steps=20", "scale=0.5")
    y = out["measurements"]
    assert y.shape == (6, 1, 4, 4)
    fit = (torch.nn.functional.avg_pool2d(out["results"], 2) - y).abs().mean()
    assert fit < (y - y.mean()).abs().mean()


@pytest.mark.parametrize("args, message", [
    (["mask=[0,0,9,4]"], r"mask=\[0, 0, 9, 4\] must be \[x0, y0, x1, y1\]"),
    (["input=rgb.npz"], r"holds \(3, 8, 8\) arrays and the model images of shape \(1, 8, 8\)"),
    (["task=colorize"], "colours gray images with a model of RGB images"),
    (["task=encode", "sampler=ancestral"], "sampler=ancestral is stochastic"),
    (["task=encode", "sampler=ddim", "eta=1"], "sampler=ddim is stochastic"),
    (["task=interpolate", "n=3", "sampler=euler"], "got 3 inputs: give an even number"),
    (["input=nothing.png"], "does not exist"),
    (["operator=down3", "task=dps"], "does not divide"),
])
def test_refusals_are_one_line(models, tmp_path, args, message):
    base = [f"ckpt={models / 'gray'}", f"input={models / 'gray.npz'}", "steps=4"]
    args = [a.replace("rgb.npz", str(models / "rgb.npz")) for a in args]
    with pytest.raises(DiffcliError, match=message):
        edit(models, tmp_path / "out", *base, *args)
    assert not (tmp_path / "out").exists()


def test_uint8_points_are_refused_as_not_images(models, tmp_path):
    np.save(tmp_path / "pts.npy", np.zeros((4, 2), np.uint8))
    with pytest.raises(DiffcliError, match=r"uint8 of shape \(4, 2\); uint8 means images"):
        edit(models, tmp_path / "out", f"ckpt={models / 'gmm'}", f"input={tmp_path / 'pts.npy'}", "steps=4")
    assert not (tmp_path / "out").exists()


def test_dps_and_repaint_refuse_a_uniform_prior(models, tmp_path):
    pts = np.full((4, 2), np.nan, np.float32)
    pts[:, 0] = 0.5
    np.save(tmp_path / "pts.npy", pts)
    for method in ("repaint", "dps"):
        with pytest.raises(DiffcliError, match=f"method={method} needs a Gaussian prior"):
            edit(models, tmp_path / "out", f"ckpt={models / 'gmm_uniform'}", f"input={tmp_path / 'pts.npy'}",
                 f"method={method}", "steps=4")


@pytest.mark.slow
def test_cli_errors_exit_2_and_leave_no_folder(models, tmp_path):
    """The real command: an unreadable image, a strength outside [0, 1], a mask image of the wrong size; one line on
    stderr, exit 2, no run folder."""
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
    cases = {"bad.png": ["input=bad.png"], "strength": ["task=sdedit", "strength=1.5"],
             "mask": ["mask=small.png", f"input={models / 'gray.npz'}"]}
    expected = {"bad.png": "cannot read image", "strength": r"strength=1.5 must be a number in [0, 1]",
                "mask": "is 5x5 pixels and the model's images 8x8"}
    for name, args in cases.items():
        r = run_cli("edit", f"ckpt={models / 'gray'}", *args, "device=cpu", f"hydra.run.dir=run_{len(name)}",
                    cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected[name] in lines[0], r.stderr
        assert not (tmp_path / f"run_{len(name)}").exists()
