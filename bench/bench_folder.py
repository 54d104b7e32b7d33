"""Images/s of the image-folder training pipeline per DataLoader worker count, against the
decode-only ceiling (PIL and torchvision.io), on a generated JPEG folder.

The folder (default 10 classes x 50 JPEGs of 256-400 px, quality 90) is written to a temporary
directory. Decode only: each file read and decoded to a uint8 RGB tensor in this process.
Pipeline: dataset.FileImages (folder_data.read_image, then RandomResizedCrop + flip
[+ TrivialAugmentWide] + normalize, or the eval resize + center crop) batched by
loaders.make_loader, as a --dataset folder run reads it; the first epoch (worker start-up) is
not timed.

    python bench/bench_folder.py [--classes 10] [--per_class 50] [--img_size 224] [--batch 64] [--record]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from common import apply_threads, bench_parser, median_seconds, record

import numpy as np
import torch
from PIL import Image

import dataset as D
import folder_data as FD
import loaders as L


def write_jpegs(root: str, classes: int, per_class: int, seed: int = 0) -> None:
    """Smooth random colour fields plus noise, 256-400 px per side, in root/train/<class>/."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, "train", f"class{c:03d}")
        os.makedirs(folder)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(256, 401, 2))
            coarse = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8))
            img = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)


def decode_pil(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def decode_torchvision(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(path, mode=ImageReadMode.RGB)


def decode_rate(paths: list[str], decode) -> float:
    return len(paths) / median_seconds(lambda: [decode(p) for p in paths], warmup=1, repeats=3)


def pipeline_rate(files: FD.FileList, transform, batch: int, workers: int, epochs: int = 2) -> float:
    """Images/s of iterating a make_loader DataLoader, after one untimed epoch."""
    ds = D.FileImages(files, transform)
    sampler = L.EpochSampler(len(ds))
    loader = L.make_loader(ds, batch, workers, sampler, drop_last=True)
    n, t0 = 0, 0.0
    for e in range(epochs + 1):
        if e == 1:
            t0 = time.perf_counter()
        ds.epoch_seed = sampler.seed = e
        for x, _ in loader:
            n += len(x) if e else 0
    rate = n / (time.perf_counter() - t0)
    del loader
    return rate


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per_class", type=int, default=50)
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    apply_threads(a.threads)
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, a.classes, a.per_class)
        _, files = FD.scan_split(os.path.join(root, "train"), "bench")
        paths = [files.path(i) for i in range(len(files))]
        pil, tv = decode_rate(paths, decode_pil), decode_rate(paths, decode_torchvision)
        lines = [
            f"{len(paths)} JPEGs ({a.classes} classes x {a.per_class}, 256-400 px), img_size {a.img_size}, "
            f"batch {a.batch}; torch threads in the main process {torch.get_num_threads()}, 1 per worker.",
            "",
            "| decode only, one process | images/s |",
            "|---|---|",
            f"| PIL (Image.open + convert RGB) | {pil:,.0f} |",
            f"| torchvision.io.decode_image (used) | {tv:,.0f} |",
            "",
            "| workers | train, ViT recipe (RRC + flip + TrivialAugment) | train, light (RRC + flip) | eval "
            "(resize + center crop) | ViT train / decode ceiling |",
            "|---|---|---|---|---|",
        ]
        print("\n".join(lines), flush=True)
        transforms = [
            FD.folder_transforms(a.img_size, strong, train)
            for strong, train in ((True, True), (False, True), (False, False))
        ]
        for w in a.workers:
            rates = [pipeline_rate(files, t, a.batch, w) for t in transforms]
            ceiling = tv * max(w, 1)
            lines.append(f"| {w} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[2]:,.0f} | {rates[0] / ceiling:.0%} |")
            print(lines[-1], flush=True)
        lines += ["", f"Decode ceiling = torchvision.io decode rate x max(workers, 1); {os.cpu_count()} CPU cores."]
    if a.record:
        record("Image-folder pipeline (--dataset folder/imagenet)", "python " + " ".join(sys.argv), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
