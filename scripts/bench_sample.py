"""Images/s of whole sampling runs: diffcli's samplers at every precision / compile / layout setting, side by side in
one process with diffusers' UNet2DModel of the same layout driven by its own DDIMScheduler loop at the same NFE.

    python scripts/bench_sample.py [--net unet_small|unet_ddpm_cifar] [--shapes 1x28x28 3x32x32] [--n 64]
                                   [--samplers heun:18 ddim:50 dpmpp_2m:20] [--device auto|cpu|cuda]
                                   [--ours SETTING ...] [--theirs SETTING ...] [--json out.json]

A SETTING is precision[+compile][+cl] (e.g. fp32, bf16+compile+cl). Both models are randomly initialised (speed
does not depend on the weights) on a DDPM path with eps prediction. diffcli's run is sampling.generate, the code
`diffcli sample` runs, with the network wrapped by sampling.at_speed at that setting, `n` samples in one batch;
diffusers' run is the loop of its DDIMPipeline (scheduler.step on the UNet's output, num_inference_steps = the
diffcli run's NFE) under torch.inference_mode, with the same autocast / channels-last / torch.compile. Each
setting is warmed up first (the compile, oneDNN's kernel choice) by a run of 2 steps; then `--repeats` timed runs,
of which the median counts.
The last lines: `auto`'s setting against fp32 eager, and against diffusers' best setting, per sampler and shape.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffcli.allocator import keep_freed_memory
from diffcli.build import build_net, build_path
from diffcli.hardware import PRECISIONS, cpu_kind, device_label
from diffcli.loading import pick_device
from diffcli.prediction import Denoiser
from diffcli.sampling import COMPILE_WORK, Speed, at_speed, generate, inference_speed, sampler_from_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import diffusers_unet  # noqa: E402  (the same layout mapping as the training benchmark)

ALL = [f"{p}{c}{l}" for p in ("fp32", "bf16") for c in ("", "+compile") for l in ("", "+cl")]


def parse(setting: str) -> Speed:
    parts = setting.split("+")
    return Speed(parts[0], "compile" in parts, "cl" in parts)


def sampler(name: str, steps: int, path):
    node = OmegaConf.load(ROOT / "configs" / "sampler" / f"{name}.yaml")
    cfg = OmegaConf.create({"steps": steps, "eta": 0.0, "sampler": node}).sampler
    return sampler_from_config(cfg, path, is_image=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(net, path, shape, name, steps, speed, n, device, repeats) -> tuple[float, int]:
    """(images/s, NFE) of a diffcli sampling run at `speed`: the median of `repeats` runs after a 2-step warm-up."""
    denoiser = at_speed(Denoiser(net, path, "eps"), speed)
    times = []
    for k in (2, *[steps] * repeats):
        fn, grid = sampler(name, k, path)
        sync(device)
        t0 = time.perf_counter()
        out = generate(denoiser, fn, grid, n, shape, batch_size=n, seed=0, device=device)
        sync(device)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times[1:]), out.nfe


def theirs(unet, shape, nfe, speed, n, device, repeats) -> float:
    """images/s of diffusers' DDIM loop (DDIMPipeline.__call__'s) for `nfe` steps at `speed`: the median of
    `repeats` runs after a 2-step warm-up."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    model = unet.to(memory_format=torch.channels_last) if speed.nhwc else unet
    run = torch.compile(model, dynamic=False) if speed.compiled else model
    dtype = PRECISIONS[speed.precision]
    g = torch.Generator(device).manual_seed(0)
    times = []
    for k in (2, *[nfe] * repeats):
        scheduler.set_timesteps(k)
        x = torch.randn((n, *shape), generator=g, device=device)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for t in scheduler.timesteps:
                xin = x.contiguous(memory_format=torch.channels_last) if speed.nhwc else x
                eps = run(xin, t).sample.float()
                x = scheduler.step(eps, t, x, eta=0.0, generator=g).prev_sample
        sync(device)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--net", choices=["unet_small", "unet_ddpm_cifar"], default="unet_small")
    parser.add_argument("--shapes", nargs="+", default=["1x28x28", "3x32x32"])
    parser.add_argument("--n", type=int, default=64, help="samples per run (one batch)")
    parser.add_argument("--samplers", nargs="+", default=["heun:18", "ddim:50", "dpmpp_2m:20"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ours", nargs="+", default=ALL, help="diffcli's settings (default: all 8)")
    parser.add_argument("--theirs", nargs="+", default=["fp32", "bf16", "fp32+compile+cl"],
                        help="diffusers' settings; its best one is compared")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting (the median is shown)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    keep_freed_memory()
    device = pick_device(args.device)
    torch.manual_seed(0)
    net_cfg = OmegaConf.load(ROOT / "configs" / "net" / f"{args.net}.yaml")
    path = build_path(OmegaConf.load(ROOT / "configs" / "model" / "ddpm.yaml").path)
    print(f"# {args.net}, {device_label(device)}, torch {torch.__version__}, n = {args.n} per run, median of "
          f"{args.repeats}", flush=True)
    rows = []
    for shape_text in args.shapes:
        shape = tuple(int(s) for s in shape_text.split("x"))
        net = build_net(net_cfg, shape).to(device).eval()
        unet = diffusers_unet(net_cfg, shape).to(device).eval()
        for spec in args.samplers:
            name, steps = spec.split(":")[0], int(spec.split(":")[1])
            # what `auto` chooses here for a run that repays the compile (n x steps >= COMPILE_WORK, e.g. n = 2,000)
            auto = inference_speed({}, device, True, COMPILE_WORK)
            for setting in args.ours:
                speed = parse(setting)
                rate, nfe = ours(net, path, shape, name, steps, speed, args.n, device, args.repeats)
                rows.append({"shape": shape_text, "sampler": f"{name} {steps}", "nfe": nfe, "who": "diffcli",
                             "setting": setting, "auto": speed == auto, "images_per_s": rate})
                print(f"{shape_text} {name:9s} NFE {nfe:3d} diffcli   {setting:18s} {rate:8.1f} img/s"
                      + ("  (auto)" if speed == auto else ""), flush=True)
            for setting in args.theirs:
                rate = theirs(unet, shape, nfe, parse(setting), args.n, device, args.repeats)
                rows.append({"shape": shape_text, "sampler": f"{name} {steps}", "nfe": nfe, "who": "diffusers",
                             "setting": setting, "auto": False, "images_per_s": rate})
                print(f"{shape_text} {name:9s} NFE {nfe:3d} diffusers {setting:18s} {rate:8.1f} img/s", flush=True)
            torch._dynamo.reset()
    print("\n| shape | sampler (NFE) | diffcli fp32 eager | diffcli auto (setting) | diffusers best (setting) | "
          "auto / fp32 eager | auto / diffusers best |\n|---|---|---|---|---|---|---|")
    for shape_text in args.shapes:
        for spec in args.samplers:
            name = spec.replace(":", " ")
            here = [r for r in rows if r["shape"] == shape_text and r["sampler"] == name]
            base = next((r for r in here if r["who"] == "diffcli" and r["setting"] == "fp32"), None)
            auto = next((r for r in here if r["auto"]), None)
            best = max((r for r in here if r["who"] == "diffusers"), key=lambda r: r["images_per_s"])
            if base and auto:
                print(f"| {shape_text} | {name} ({auto['nfe']}) | {base['images_per_s']:.1f} | "
                      f"{auto['images_per_s']:.1f} ({auto['setting']}) | {best['images_per_s']:.1f} "
                      f"({best['setting']}) | {auto['images_per_s'] / base['images_per_s']:.2f} | "
                      f"{auto['images_per_s'] / best['images_per_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_label(device), "cpu_kind": cpu_kind(),
                                               "net": args.net, "n": args.n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
