"""What `auto` chooses on each kind of device, from what was measured there (docs/benchmarks.md, "CPU kinds").

A CPU's kind is what its instruction set offers the network's convolutions and matmuls (oneDNN): AMX tiles,
AVX-512 with bf16 dot products, AVX-512 without them, or AVX2. The tables hold the bf16-over-fp32 speed of
`unet_small` measured on each kind; `auto` runs bf16 only where it was measured to pay, and fp32 where nothing
was measured. Names of CPU models never enter the decision.
"""

from __future__ import annotations

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes (None: none)
# bf16 autocast over fp32 images/s, eager, unet_small, 2 cores, per CPU kind (None: not measured there).
# Training: one step (batch 32, 32x32x3) with AdamW; sampling: a whole sampling run, or a forward at batch 256.
BF16_SPEEDUP = {
    "train": {
        "amx": 1.78,          # 231.7 / 130.0 img/s, Xeon with AMX, 2026-11-23, b52956d
        "avx512_bf16": None,  # AMD EPYC with AVX-512 bf16: not yet measured for training
        "avx512": 0.48,       # 32.7 / 68.4 img/s, Xeon Ice Lake, 2026-12-04 (scripts/bench_train.py --steps 8)
        "avx2": 0.07,         # 3.5 / 52.3, AMD EPYC with AVX2, 2026-11-23, 4e616c7 (emulated bf16)
    },
    "sample": {
        "amx": 1.78,          # not measured for a forward alone: the training step's figure, whose forward is part
        "avx512_bf16": 2.37,  # 445 / 188 img/s at 28x28x1, 306 / 113 at 32x32x3 (2.7x): AMD EPYC, issue 26
        "avx512": 0.49,       # heun-18 runs, 2.5 / 5.1 img/s at 32x32x3 (0.27 at 28x28x1), Xeon Ice Lake, 2026-12-04
                              # (scripts/bench_sample.py; docs/benchmarks.md, "Sampling speed")
        "avx2": 0.07,         # the training figure: bf16 is emulated there
    },
}
PAYS = 1.1  # a measured gain below 10% is within the host's drift between runs: fp32 stays


def cpu_kind() -> str:
    """amx | avx512_bf16 | avx512 | avx2 | other: the widest bf16/fp32 units this CPU offers (torch's cpuinfo)."""
    probe = lambda name: bool(getattr(torch.cpu, name, lambda: False)())  # noqa: E731
    if probe("_is_amx_tile_supported"):
        return "amx"
    if probe("_is_avx512_bf16_supported"):
        return "avx512_bf16"
    if probe("_is_avx512_supported"):
        return "avx512"
    return "avx2" if probe("_is_avx2_supported") else "other"


def cpu_name() -> str:
    """The CPU's model name as `lscpu` gives it (benchmark tables name the machine next to every figure)."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"


def bf16_pays(device: torch.device, task: str) -> bool:
    """Whether bf16 autocast was measured faster than fp32 for `task` ("train" or "sample") on this device's kind:
    a CUDA GPU with bf16, or a CPU kind whose measured speed-up is at least PAYS."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    speedup = BF16_SPEEDUP[task].get(cpu_kind())
    return speedup is not None and speedup >= PAYS


def device_label(device: torch.device) -> str:
    """The device for logs and benchmark tables: the GPU's name, or the CPU's kind and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_kind()}, {torch.get_num_threads()} threads)"
