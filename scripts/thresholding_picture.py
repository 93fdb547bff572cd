"""Static clipping against dynamic thresholding on the same CFG-guided MNIST samples: docs/mnist_thresholding.png.

Samples the class-conditional flow of scripts/mnist_conditional.py (outputs/mnist12/flow_cond) with 18-step
DDIM at a large guidance weight, the same noise for both settings, through the real `diffcli sample` command.

    python scripts/thresholding_picture.py --guidance 6
"""

import argparse
import subprocess
import sys
from pathlib import Path

SETTINGS = {"static clipping": ["sampler.fn.clip_x0=static"],
            "dynamic thresholding": ["sampler.fn.clip_x0=dynamic", "sampler.fn.dynamic_thresholding_ratio=0.995",
                                     "sampler.fn.sample_max_value=10"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="outputs/mnist12/flow_cond")
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=Path("docs/mnist_thresholding.png"))
    a = ap.parse_args()
    from PIL import Image, ImageDraw

    panels = []
    for i, (title, options) in enumerate(SETTINGS.items()):
        run = Path(a.ckpt) / f"thresholding_w{a.guidance:g}_{i}"
        subprocess.run([sys.executable, "-m", "diffcli", "sample", f"ckpt={a.ckpt}", "sampler=ddim", "steps=18",
                        f"guidance={a.guidance}", "n=100", *options, f"hydra.run.dir={run}"], check=True)
        panels.append((f"{title}, w = {a.guidance:g}", Image.open(run / "samples.png").convert("L")))
    w, h = panels[0][1].size
    sheet = Image.new("L", (2 * w + 8, h + 22), 255)
    draw = ImageDraw.Draw(sheet)
    for k, (title, image) in enumerate(panels):
        sheet.paste(image, (k * (w + 8), 22))
        draw.text((k * (w + 8) + 8, 5), title, fill=0)
    sheet.save(a.out, optimize=True)
    print(a.out)


if __name__ == "__main__":
    main()
