"""The MNIST editing table of docs/guides/editing.md (issue 28): inpainting of the hidden bottom half of test digits
(replace, RePaint, DPS) and SDEdit from coarse (4x4 block-averaged) digits, scored by how often the classifier-FID
network (diffcli/cfid.py) reads each result as the digit's true label, next to the true digits and the inputs.

Only the 10,000 MNIST test digits ship in ../shared/data, so the model and the classifier are trained on digits
n..9999 and the table is made of digits 0..n-1, which neither has seen:

    python scripts/mnist_editing.py --data ../shared/data --out /tmp/mnist_edit --train   # trains, then edits
    python scripts/mnist_editing.py --data ../shared/data --out /tmp/mnist_edit           # edits with its model

The model is `diffcli train data=npz net=unet_small train=quick train.steps=1500` (flow matching) on those digits.
Every edit runs the real `diffcli edit` command; the picture is written to --picture.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

DIFFCLI = str(Path(sys.executable).with_name("diffcli"))
EDITS = {  # name -> diffcli edit arguments (after ckpt=, input=)
    "inpaint, replace": ["task=inpaint", "method=replace", "mask=bottom", "steps=50"],
    "inpaint, RePaint (jump 5, 3 times)": ["task=inpaint", "method=repaint", "mask=bottom", "steps=50",
                                           "jump_length=5", "jump_n_sample=3"],
    "inpaint, DPS (scale 1)": ["task=inpaint", "method=dps", "mask=bottom", "steps=50", "scale=1.0"],
    "SDEdit, strength 0.25": ["task=sdedit", "strength=0.25", "steps=50"],
    "SDEdit, strength 0.5": ["task=sdedit", "strength=0.5", "steps=50"],
    "SDEdit, strength 0.75": ["task=sdedit", "strength=0.75", "steps=50"],
}


def mnist_test(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test digits (uint8 (N, 28, 28)) and labels from the IDX files under root/MNIST/raw."""
    raw = root / "MNIST" / "raw"
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], np.uint8).astype(np.int64)
    return images, labels


def coarse(images: np.ndarray) -> np.ndarray:
    """4x4 block averages, shown at full size (28 = 7 blocks of 4)."""
    blocks = images.reshape(-1, 7, 4, 7, 4).astype(np.float64).mean((2, 4))
    return np.repeat(np.repeat(blocks, 4, 1), 4, 2).round().astype(np.uint8)


def run(*args, cwd: Path) -> None:
    r = subprocess.run([DIFFCLI, *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"diffcli {' '.join(args)} failed:\n{r.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/mnist_edit"))
    parser.add_argument("--n", type=int, default=500, help="digits 0..n-1 are edited, n..9999 train")
    parser.add_argument("--edit-n", type=int, default=None, help="edit only the first k of them (a quick look)")
    parser.add_argument("--train", action="store_true", help="train the model first (about 9 minutes on 2 cores)")
    parser.add_argument("--picture", type=Path, default=Path("docs/mnist_editing.png"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    images, labels = mnist_test(args.data)
    np.savez(out / "train.npz", images=images[args.n:], labels=labels[args.n:])
    np.savez(out / "digits.npz", images=images[:args.n], labels=labels[:args.n])
    np.savez(out / "coarse.npz", images=coarse(images[:args.n]))
    model = out / "model"
    if args.train:
        run("train", "data=npz", f"data.path={out / 'train.npz'}", "net=unet_small", "train=quick",
            "train.steps=1500", "train.ckpt_every=1500", "train.sample_every=1500", f"hydra.run.dir={model}", cwd=out)

    from diffcli.cfid import classifier_for, classifier_outputs
    from diffcli.data import to_float
    from diffcli.hardware import cpu_name
    from diffcli.plots import save_edit_picture

    k = args.edit_n or args.n
    print(cpu_name(),
          f"| torch {torch.__version__} | digits 0..{k - 1} (model and classifier trained on {args.n}..9999)")
    classifier, info = classifier_for({"kind": "npz", "name": "mnist-train", "path": str(out / "train.npz")},
                                      cache_dir=out / "cache", device="cpu")
    print(f"classifier: held-out accuracy {info['accuracy']:.4f} on {info['n_test']} of its training digits")
    truth = torch.from_numpy(labels[:k])
    x = to_float(torch.from_numpy(images[:k].copy())[:, None])

    def accuracy(batch: torch.Tensor) -> float:
        probs = classifier_outputs(classifier, ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))[1]
        return (probs.argmax(1) == truth).double().mean().item()

    hidden = torch.zeros(28, 28, dtype=torch.bool)
    hidden[14:] = True
    visible = torch.where(hidden, -1.0, x)  # the bottom half zero-filled (black)
    rough = to_float(torch.from_numpy(coarse(images[:k]))[:, None])
    print("\n| input or edit | NFE | classifier reads the true label | MSE on the hidden half | seconds |")
    print("|---|---|---|---|---|")
    print(f"| true digits | - | {accuracy(x):.3f} | 0 | - |")
    print(f"| visible half, bottom zero-filled | - | {accuracy(visible):.3f} | "
          f"{((visible - x)[..., 14:, :] ** 2).mean():.3f} | - |")
    print(f"| coarse (4x4 block averages) | - | {accuracy(rough):.3f} | {((rough - x)[..., 14:, :] ** 2).mean():.3f} | - |")
    columns = [("true", x), ("bottom hidden", visible)]
    for name, edit_args in EDITS.items():
        source = out / ("coarse.npz" if "sdedit" in edit_args[0] else "digits.npz")
        folder = out / "edits" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        start = time.perf_counter()
        run("edit", f"ckpt={model}", f"input={source}", f"n={k}", *edit_args, f"hydra.run.dir={folder}", cwd=out)
        seconds = time.perf_counter() - start
        with np.load(folder / "edited.npz") as z:
            result, nfe = torch.from_numpy(z["results"]), int(z["nfe"])
        mse = ((result - x)[..., 14:, :] ** 2).mean().item()
        print(f"| {name} | {nfe} | {accuracy(result):.3f} | {mse:.3f} | {seconds:.0f} |", flush=True)
        if name.startswith("SDEdit, strength 0.25"):
            columns.append(("coarse", rough))
        columns.append((name.split(" (")[0].replace("inpaint, ", "").replace(", strength", ""), result))
    save_edit_picture([(n, c[:12]) for n, c in columns], args.picture,
                      "MNIST test digits the model never saw: inpainting the bottom half, SDEdit from 4x4 blocks")
    print(f"\nwrote {args.picture}")


if __name__ == "__main__":
    main()
