"""Training throughput of diffcli's DDPM U-Net step against diffusers' UNet2DModel, in one run on one device.

    python scripts/bench_train.py [--net unet_small|unet_ddpm_cifar] [--batch 32] [--steps 10] [--warmup 3]
                                  [--device auto|cpu|cuda] [--precision fp32|bf16|fp16] [--compile]
                                  [--channels-last] [--threads N] [--matrix] [--json out.json]

--matrix measures every precision (fp32, bf16) x channels-last x compile for both models, then the fastest of
those at each smaller thread count, and prints the table and the best-against-best ratio.

diffcli: `UNet` from configs/net/<net>.yaml, one `diffcli.training.train_step` (DDPM path, eps prediction,
L_simple; the whole batch in one pass) with the optimizer, grad scaler and autocast of
`diffcli.training.build_optimization` (the train=default preset: AdamW as diffcli builds it), grad clip 1.0,
a per-step generator as the training loop uses.
diffusers: `UNet2DModel` with the same widths, attention resolutions, blocks per level, dropout and groups
(the google/ddpm-cifar10-32 layout for unet_ddpm_cifar: identical parameter count), trained the way the
diffusers examples do (DDPMScheduler.add_noise at random integer steps, MSE on eps) with the very same
optimizer / scaler / autocast construction and clipping. Both step on the same fixed batch; the data
pipeline (`ImageData.batch`) is timed on its own. The two models are timed step by step in alternating
rounds (ABBA), after warm-up, with the device synchronised around every step; images/s is batch / the
median step time (robust to other processes' bursts on a shared machine; the mean is in --json too).

Memory: the process runs with the malloc setting of diffcli's commands (diffcli.allocator; --glibc-default
keeps glibc's own). It is process-wide, so it holds for both models; scripts/bench_allocator.py measures what it
does to diffcli's step alone, in separate processes.

FLOP/s: forward + backward FLOPs of one step (torch.utils.flop_counter, eager model; the optimizer's
elementwise work is not counted) over the measured step time, as a fraction of a plain n x n matmul
timed in the same run (fp32 on CUDA uses TF32 when cuDNN does, i.e. the math mode of the net's convs).
"""

import argparse
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from diffcli.allocator import keep_freed_memory
from diffcli.data import ImageData
from diffcli.losses import denoising_loss
from diffcli.paths import DDPMPath
from diffcli.loading import pick_device
from diffcli.schema import ModelConfig
from diffcli.distributed import World
from diffcli.hardware import PRECISIONS
from diffcli.training import build_optimization, step_generator, train_step

ROOT = Path(__file__).resolve().parents[1]
# configs/model/ddpm.yaml's choices over the schema's defaults (precond, sigma_data, times, snr_gamma)
MODEL = OmegaConf.structured(ModelConfig(name="ddpm", path={}, prediction="eps", weighting="simple", sampler="ancestral"))
DATA_BATCHES = 100  # batches timed for the data pipeline


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def diffusers_unet(cfg, shape):
    """UNet2DModel with diffcli UNet `cfg`'s layout (the mapping tests/test_nets.py checks for the CIFAR net)."""
    from diffusers import UNet2DModel

    if cfg.get("time_embedding", "sinusoidal") != "sinusoidal":
        raise SystemExit(f"--net: time_embedding={cfg.time_embedding} has no diffusers counterpart here; use sinusoidal")
    mult, attn = [int(m) for m in cfg.ch_mult], {int(r) for r in cfg.attn_resolutions}
    res = [shape[1] // 2**level for level in range(len(mult))]  # resolution of each level
    return UNet2DModel(
        sample_size=shape[1], in_channels=shape[0], out_channels=shape[0],
        block_out_channels=tuple(int(cfg.ch) * m for m in mult), layers_per_block=int(cfg.num_res_blocks),
        down_block_types=tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res),
        up_block_types=tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res)),
        norm_num_groups=int(cfg.groups), norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, attention_head_dim=None, dropout=float(cfg.dropout),
    )


def optimization(net, device, precision):
    """build_optimization with the train=default preset (AdamW lr 2e-4, grad clip 1.0) at this precision."""
    tc = OmegaConf.load(ROOT / "configs" / "train" / "default.yaml")
    _, opt, scaler, autocast = build_optimization(OmegaConf.create({"train": tc}), net, device, precision)  # EMA unused
    return opt, scaler, autocast, float(tc.grad_clip)


class DiffcliStep:
    """One diffcli training step: diffcli.training.train_step itself, seeded per step like the training loop."""

    def __init__(self, net, x0, device, precision):
        self.net, self.x0, self.device, self.path, self.step = net, x0, device, DDPMPath(), 0
        self.opt, self.scaler, self.autocast, self.clip = optimization(net, device, precision)
        self.world = World(device=device)  # one process, the whole batch in one pass

    def loss(self, net, g=None):
        return denoising_loss(net, self.path, MODEL.prediction, self.x0, g, weighting=MODEL.weighting)

    def __call__(self, net):
        g = step_generator(0, self.step, self.device)
        train_step(net, self.path, MODEL, self.x0, g, self.opt, self.scaler, self.autocast, self.clip,
                   micro=len(self.x0), world=self.world)
        self.step += 1


class DiffusersStep:
    """One diffusers training step (train_unconditional.py's loss), same optimizer, scaler, autocast, clipping."""

    def __init__(self, net, x0, device, precision):
        from diffusers import DDPMScheduler

        self.net, self.x0, self.device = net, x0, device
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        self.opt, self.scaler, self.autocast, self.clip = optimization(net, device, precision)

    def loss(self, net):
        noise = torch.randn_like(self.x0)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.x0.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(self.x0, noise, steps)
        return F.mse_loss(net(noisy, steps, return_dict=False)[0].float(), noise.float())

    def __call__(self, net):
        with self.autocast:
            loss = self.loss(net)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), self.clip or math.inf)
        self.scaler.step(self.opt)
        self.scaler.update()


def count_flops(step, net) -> int:
    """FLOPs of forward + backward of one step's loss on the eager net (grads cleared afterwards)."""
    with FlopCounterMode(display=False) as counter:
        with step.autocast:
            loss = step.loss(net)
        loss.backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_steps(fn, n, device) -> list[float]:
    """Seconds of each of n calls of fn, the device synchronised around each."""
    seconds = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_training(runs, steps, warmup, device):
    """Per-step seconds of each model over `steps` timed steps, in alternating rounds (ABBA) after warm-up."""
    for step, net in runs.values():
        time_steps(lambda: step(net), warmup, device)
    rounds = min(steps, 5)
    chunks = [steps // rounds + (i < steps % rounds) for i in range(rounds)]
    seconds = {name: [] for name in runs}
    for r, chunk in enumerate(chunks):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            step, net = runs[name]
            seconds[name] += time_steps(lambda: step(net), chunk, device)
    return seconds


def host_syncs(step, net, device) -> int | None:
    """Synchronising calls inside one training step (torch.cuda.set_sync_debug_mode's warnings); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(net)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def matmul_flops(n, dtype, device, reps) -> float:
    """FLOP/s of a plain n x n @ n x n matmul: 2 n^3 / time (best of `reps` synchronised runs after warm-up)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda" and dtype == torch.float32:  # the math mode cuDNN uses for the net's fp32 convs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        for _ in range(2):
            a @ b
        best = min(time_steps(lambda: a @ b, reps, device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n**3 / best


def data_throughput(shape, batch, device) -> float:
    """images/s of ImageData.batch (10,000 random uint8 images on the device, hflip on)."""
    images = torch.randint(0, 256, (10_000, *shape), dtype=torch.uint8)
    data = ImageData("random", images, device=device, seed=0, hflip=True)
    steps = iter(range(DATA_BATCHES + 5))

    def one_batch():
        step = next(steps)
        data.batch(step, batch, step_generator(0, step, device))  # as the training loop draws it

    seconds = time_steps(one_batch, DATA_BATCHES + 5, device)[5:]  # 5 warm-up batches (and the first permutation)
    return batch / statistics.median(seconds)


def unet_and_batch(net_name, shape, batch, device, channels_last):
    """diffcli's U-Net of configs/net/<net_name>.yaml (seed 0), its config, and a fixed batch in [-1, 1]."""
    cfg = OmegaConf.load(ROOT / "configs" / "net" / f"{net_name}.yaml")
    memory = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    net = instantiate(cfg, shape=shape).to(device, memory_format=memory).train()
    x0 = (2 * torch.rand(batch, *shape, device=device) - 1).contiguous(memory_format=memory)
    return net, cfg, x0


def measure(net_name, shape, batch, steps, warmup, device, precision, compile, channels_last, matmul_n=None):
    """Every number of one setting: both models' step times, FLOPs, the matmul reference and the data pipeline."""
    torch._dynamo.reset()  # each setting compiles afresh (a matrix run measures several in one process)
    ours, cfg, x0 = unet_and_batch(net_name, shape, batch, device, channels_last)
    torch.manual_seed(0)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    theirs = diffusers_unet(cfg, shape).to(device, memory_format=memory).train()
    step_fns = {"diffcli": DiffcliStep(ours, x0, device, precision),
                "diffusers": DiffusersStep(theirs, x0, device, precision)}
    flops = {name: count_flops(step_fns[name], net) for name, net in (("diffcli", ours), ("diffusers", theirs))}
    nets = {"diffcli": ours, "diffusers": theirs}
    compile_s = {name: 0.0 for name in nets}
    if compile:
        nets = {name: torch.compile(net) for name, net in nets.items()}
        for name in nets:  # the one-off compile, timed on its own (the first step traces and compiles)
            compile_s[name] = sum(time_steps(lambda: step_fns[name](nets[name]), 1, device))
    seconds = time_training({name: (step_fns[name], nets[name]) for name in step_fns}, steps, warmup, device)
    syncs = {name: host_syncs(step_fns[name], nets[name], device) for name in step_fns}

    dtype = PRECISIONS[precision] or torch.float32
    n = matmul_n or (8192 if device.type == "cuda" else 2048)
    peak = matmul_flops(n, dtype, device, reps=20 if device.type == "cuda" else 5)
    data_ips = data_throughput(shape, batch, device)

    result = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "diffusers_version": __import__("diffusers").__version__, "net": net_name, "shape": list(shape), "batch": batch,
        "steps": steps, "warmup": warmup, "precision": precision, "compile": compile, "threads": torch.get_num_threads(),
        "channels_last": channels_last, "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_flop_per_s": peak, "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                            "cudnn": torch.backends.cudnn.allow_tf32},
    }
    for name in step_fns:
        step_s = statistics.median(seconds[name])  # robust to other processes' bursts on a shared machine
        result[name] = {"params": n_params(nets[name]), "images_per_s": batch / step_s, "step_ms": 1e3 * step_s,
                        "images_per_s_mean": batch * steps / sum(seconds[name]), "compile_s": compile_s[name],
                        "host_syncs_per_step": syncs[name],
                        "step_seconds": seconds[name], "flops_per_step": flops[name],
                        "flop_per_s": flops[name] / step_s, "matmul_fraction": flops[name] / step_s / peak}
    result["ratio_diffcli_over_diffusers"] = result["diffcli"]["images_per_s"] / result["diffusers"]["images_per_s"]
    result["data_images_per_s"] = data_ips
    result["data_over_train"] = data_ips / result["diffcli"]["images_per_s"]
    return result


def matrix(args, device, shape):
    """Each of precision x channels-last x compile (and the best of them at every thread count), both models."""
    rows = []
    threads = torch.get_num_threads()
    for precision in args.precisions:
        for nhwc in (False, True):
            for comp in (False, True):
                rows.append(measure(args.net, shape, args.batch, args.steps, args.warmup, device, precision, comp, nhwc))
                report_row(rows[-1])
    best = max(rows, key=lambda r: r["diffcli"]["images_per_s"])
    for n in range(1, threads if not args.no_threads else 1):  # fewer threads than cores, at the fastest setting
        torch.set_num_threads(n)
        rows.append(measure(args.net, shape, args.batch, args.steps, args.warmup, device, best["precision"],
                            best["compile"], best["channels_last"]))
        report_row(rows[-1])
    torch.set_num_threads(threads)
    return rows


def add_net_arguments(parser: argparse.ArgumentParser) -> None:
    """--net, --image-size, --channels, --batch: the U-Net and the batch it trains on."""
    parser.add_argument("--net", choices=["unet_small", "unet_ddpm_cifar"], default="unet_small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_net_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps per model first")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--matrix", action="store_true",
                        help="measure every precision (fp32, bf16) x channels-last x compile, then fewer threads")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["fp32", "bf16"],
                        help="--matrix: the precisions to measure")
    parser.add_argument("--no-threads", action="store_true", help="--matrix: skip the fewer-threads rows")
    parser.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="keep glibc's default malloc instead of the setting diffcli's commands run with")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be positive, --warmup non-negative")
    if not args.glibc_default:
        keep_freed_memory()  # as `diffcli train` runs; process-wide, so the diffusers model runs with it too
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    shape = (args.channels, args.image_size, args.image_size)
    if args.matrix:
        rows = matrix(args, device, shape)
        report_matrix(rows)
        result = {"rows": rows}
    else:
        result = measure(args.net, shape, args.batch, args.steps, args.warmup, device, args.precision, args.compile,
                         args.channels_last, args.matmul_n)
        report(result)
    result["malloc"] = "glibc default" if args.glibc_default else "diffcli.allocator"
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


def setting(r) -> str:
    flags = [f for f, on in (("compile", r["compile"]), ("channels-last", r["channels_last"])) if on]
    return f"{r['precision']} {' + '.join(flags) or 'eager'}, {r['threads']} thread{'s' * (r['threads'] > 1)}"


def report_row(r):
    print(f"{setting(r)}: diffcli {r['diffcli']['images_per_s']:.1f} images/s, diffusers "
          f"{r['diffusers']['images_per_s']:.1f} (ratio {r['ratio_diffcli_over_diffusers']:.2f})", flush=True)


def report_matrix(rows):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    r0 = rows[0]
    console.print(f"device {r0['device']}   torch {r0['torch']}   diffusers {r0['diffusers_version']}   net {r0['net']}, "
                  f"images {'x'.join(map(str, r0['shape']))}, batch {r0['batch']}, {r0['steps']} timed steps per model")
    table = Table(title="training step images/s (median step), each setting for both models in one process")
    for col in ("setting", "diffcli", "diffusers", "diffcli / diffusers", "compile s (diffcli)"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        table.add_row(setting(r), f"{r['diffcli']['images_per_s']:.1f}", f"{r['diffusers']['images_per_s']:.1f}",
                      f"{r['ratio_diffcli_over_diffusers']:.2f}", f"{r['diffcli']['compile_s']:.0f}")
    console.print(table)
    ours = max(rows, key=lambda r: r["diffcli"]["images_per_s"])
    theirs = max(rows, key=lambda r: r["diffusers"]["images_per_s"])
    ratio = ours["diffcli"]["images_per_s"] / theirs["diffusers"]["images_per_s"]
    console.print(f"best diffcli: {setting(ours)}, {ours['diffcli']['images_per_s']:.1f} images/s; best diffusers: "
                  f"{setting(theirs)}, {theirs['diffusers']['images_per_s']:.1f} images/s; ratio {ratio:.2f}")


def report(r):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=110)
    console.print(f"device {r['device']}   torch {r['torch']}   diffusers {r['diffusers_version']}   {setting(r)}")
    console.print(f"net {r['net']}, images {'x'.join(map(str, r['shape']))}, batch {r['batch']}, "
                  f"{r['steps']} timed steps after {r['warmup']} warm-up, per model")
    table = Table(title="training step: forward + backward + AdamW")
    table.add_column("")
    for name in ("diffcli", "diffusers"):
        table.add_column(name, justify="right")
    table.add_column("diffcli / diffusers", justify="right")
    d, h = r["diffcli"], r["diffusers"]
    rows = [("parameters", f"{d['params']:,}", f"{h['params']:,}", f"{d['params'] / h['params']:.3f}"),
            ("images/s (median step)", f"{d['images_per_s']:.1f}", f"{h['images_per_s']:.1f}",
             f"{r['ratio_diffcli_over_diffusers']:.3f}"),
            ("ms / step", f"{d['step_ms']:.1f}", f"{h['step_ms']:.1f}", f"{d['step_ms'] / h['step_ms']:.3f}"),
            ("GFLOP / step (fwd + bwd)", f"{d['flops_per_step'] / 1e9:.2f}", f"{h['flops_per_step'] / 1e9:.2f}",
             f"{d['flops_per_step'] / h['flops_per_step']:.3f}"),
            ("achieved TFLOP/s", f"{d['flop_per_s'] / 1e12:.3f}", f"{h['flop_per_s'] / 1e12:.3f}",
             f"{d['flop_per_s'] / h['flop_per_s']:.3f}"),
            ("fraction of matmul FLOP/s", f"{d['matmul_fraction']:.3f}", f"{h['matmul_fraction']:.3f}", "")]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    tf32 = " (TF32)" if r["device_type"] == "cuda" and r["matmul_dtype"] == "float32" and r["tf32"]["cudnn"] else ""
    console.print(f"matmul {r['matmul_n']}x{r['matmul_n']} {r['matmul_dtype']}{tf32}: "
                  f"{r['matmul_flop_per_s'] / 1e12:.3f} TFLOP/s")
    if d["host_syncs_per_step"] is not None:
        console.print(f"host syncs inside one step (set_sync_debug_mode): diffcli {d['host_syncs_per_step']}, "
                      f"diffusers {h['host_syncs_per_step']}")
    console.print(f"data pipeline (ImageData.batch, hflip): {r['data_images_per_s']:,.0f} images/s = "
                  f"{r['data_over_train']:.0f}x diffcli's training step ({d['images_per_s']:.1f} images/s)")


if __name__ == "__main__":
    main()
