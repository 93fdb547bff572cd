"""The diffusers table of docs/guides/diffusers.md (issue 29): a UNet2DModel trained on MNIST with diffusers' own
scheduler and loss, imported and sampled by diffcli's samplers at equal NFE next to its own DDIMPipeline; and the
other way, a diffcli-trained DDPM exported and sampled by DDIMPipeline. Everything is scored by classifier-FID
(diffcli/cfid.py) on 500 samples against digits neither model nor classifier has seen.

Only the 10,000 MNIST test digits ship in ../shared/data: both models and the classifier train on digits n..9999,
the reference is digits 0..n-1.

    python scripts/diffusers_mnist.py --data ../shared/data --out /tmp/diffusers_mnist --minutes 12
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_editing import mnist_test  # noqa: E402

DIFFCLI = str(Path(sys.executable).with_name("diffcli"))
# diffcli samplers on the imported model: (sampler, steps); NFE is what sample.npz records
IMPORTED = [("ddim", 50), ("ddim", 10), ("heun", 10), ("dpmpp_2m", 10), ("dpmpp_2m", 20), ("unipc", 10),
            ("unipc", 20)]


def run(*args, cwd: Path) -> None:
    r = subprocess.run([DIFFCLI, *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"diffcli {' '.join(args)} failed:\n{r.stderr[-2000:]}")


def train_diffusers(images: np.ndarray, folder: Path, minutes: float, batch: int = 32, seed: int = 0) -> int:
    """diffusers' train_unconditional recipe, small: UNet2DModel, DDPMScheduler.add_noise, MSE on eps, AdamW, an
    EMA of the weights; saved as a DDIMPipeline folder. Returns the steps taken."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ema = EMAModel(unet.parameters(), decay=0.995)
    x_all = torch.from_numpy(images.copy()).float()[:, None] / 127.5 - 1
    g, step, end = torch.Generator().manual_seed(seed), 0, time.time() + 60 * minutes
    while time.time() < end:
        x0 = x_all[torch.randint(len(x_all), (batch,), generator=g)]
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (batch,), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
        step += 1
        if step % 500 == 0:
            print(f"  diffusers training step {step}: loss {loss.item():.4f}", flush=True)
    ema.copy_to(unet.parameters())
    DDIMPipeline(unet.eval(), DDIMScheduler.from_config(scheduler.config)).save_pretrained(folder)
    return step


def pipeline_samples(folder: Path, n: int, steps: int = 50, seed: int = 0, **options) -> torch.Tensor:
    """n uint8 digits from DDIMPipeline (eta 0) on the folder."""
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = [pipe(batch_size=250, generator=torch.Generator().manual_seed(seed + k), num_inference_steps=steps,
                output_type="np", **options).images for k in range(0, n, 250)]
    return torch.from_numpy((np.concatenate(out)[:n] * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)


def diffcli_samples(ckpt: Path, out: Path, sampler: str, steps: int, n: int, *extra) -> tuple[torch.Tensor, int]:
    """(n uint8 digits, NFE) from `diffcli sample`."""
    folder = out / "samples" / f"{ckpt.name}_{sampler}_{steps}" / "_".join(e.rsplit("=", 1)[-1] for e in extra)
    shutil.rmtree(folder, ignore_errors=True)
    run("sample", f"ckpt={ckpt}", f"sampler={sampler}", f"steps={steps}", f"n={n}", "batch_size=250", *extra,
        f"hydra.run.dir={folder}", cwd=out)
    with np.load(folder / "samples.npz") as z:
        x = torch.from_numpy(z["samples"])
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), int(z["nfe"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/diffusers_mnist"))
    parser.add_argument("--n", type=int, default=1000, help="digits 0..n-1 are the reference, n..9999 train")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=12.0, help="diffusers training time (batch 32)")
    parser.add_argument("--diffcli-steps", type=int, default=1200, help="diffcli training steps (model=ddpm)")
    args = parser.parse_args()
    from diffcli.allocator import keep_freed_memory

    keep_freed_memory()  # the malloc setting diffcli's own commands run under, for both models alike
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    images, labels = mnist_test(args.data)
    np.savez(out / "train.npz", images=images[args.n:], labels=labels[args.n:])

    from diffcli.cfid import classifier_for, classifier_fid
    from diffcli.hardware import cpu_name

    print(cpu_name(), f"| torch {torch.__version__} | reference digits 0..{args.n - 1}, training digits "
          f"{args.n}..9999 | {args.samples} samples each")
    classifier, info = classifier_for({"kind": "npz", "name": "mnist-train", "path": str(out / "train.npz")},
                                      cache_dir=out / "cache", device="cpu")
    reference = torch.from_numpy(images[:args.n].copy())[:, None]

    def score(x: torch.Tensor) -> str:
        s = classifier_fid(classifier, x, reference)
        return f"{s['cfid']:.2f} | {s['confidence']:.3f}"

    rows = ["| model | sampler | NFE | classifier-FID | confidence |", "|---|---|---|---|---|"]
    folder = out / "diffusers_model"
    if not folder.exists():
        start = time.time()
        steps = train_diffusers(images[args.n:], folder, args.minutes)
        print(f"diffusers UNet2DModel: {steps} steps in {time.time() - start:.0f} s", flush=True)
    rows.append(f"| diffusers-trained | DDIMPipeline, 50 steps | 50 | {score(pipeline_samples(folder, args.samples))} |")
    imported = out / "imported"
    shutil.rmtree(imported, ignore_errors=True)
    run("import", str(folder), f"out={imported}", "data=mnist", cwd=out)
    for sampler, steps in IMPORTED:
        x, nfe = diffcli_samples(imported, out, sampler, steps, args.samples)
        rows.append(f"| diffusers-trained, imported | diffcli {sampler}, {steps} steps | {nfe} | {score(x)} |")
        print(rows[-1], flush=True)

    run_dir = out / "diffcli_model"
    if not run_dir.exists():
        start = time.time()
        run("train", "data=npz", f"data.path={out / 'train.npz'}", "model=ddpm", "net=unet_small", "train=quick",
            f"train.steps={args.diffcli_steps}", f"train.ckpt_every={args.diffcli_steps}",
            f"train.sample_every={args.diffcli_steps}", f"hydra.run.dir={run_dir}", cwd=out)
        print(f"diffcli model=ddpm unet_small: {args.diffcli_steps} steps in {time.time() - start:.0f} s", flush=True)
    exported = out / "exported"
    shutil.rmtree(exported, ignore_errors=True)
    run("export", str(run_dir), str(exported), cwd=out)
    for clipped in ("true", "false"):  # diffcli's own default (the clipped x0's eps), then DDIMPipeline's
        x, nfe = diffcli_samples(run_dir, out, "ddim", 50, args.samples,
                                 f"sampler.fn.use_clipped_model_output={clipped}")
        rows.append(f"| diffcli-trained | diffcli ddim, 50 steps, use_clipped_model_output={clipped} | {nfe} | "
                    f"{score(x)} |")
    for clipped in (True, False):
        rows.append(f"| diffcli-trained, exported | DDIMPipeline, 50 steps, use_clipped_model_output={clipped} | 50 | "
                    f"{score(pipeline_samples(exported, args.samples, use_clipped_model_output=clipped))} |")
    print(f"\nclassifier: held-out accuracy {info['accuracy']:.4f}; real digits "
          f"{score(torch.from_numpy(images[args.n:args.n + args.samples].copy())[:, None])}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
