"""Images/s of the GPU-resident loader (dataset.DeviceLoader) against the CPU DataLoader, on
CIFAR-shaped synthetic data (50k uint8 images), for the CNN and the ViT augmentation.
GPU only: exits 0 with a note on a machine without CUDA.

    python bench/bench_loader.py [--images 50000] [--batch 128] [--workers 4] [--record]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import record

import dataset as D


def images_per_second(loader, device: torch.device, epochs: int = 2) -> float:
    """Throughput of iterating `loader` with every batch moved to `device` (no model)."""
    n, t0 = 0, None
    for e in range(epochs + 1):  # the first epoch warms up (workers, CUDA kernels)
        if e == 1:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            n += len(x) if e else 0
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--record", action="store_true", help="append the numbers to bench/RESULTS.md")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_loader: no CUDA device here; nothing measured")
        return 0
    device = torch.device("cuda")
    lines = ["| augmentation | CPU DataLoader img/s | GPU-resident img/s | speedup |", "|---|---|---|---|"]
    for family, vit in (("CNN (crop+flip)", False), ("ViT (crop+flip+TrivialAugment)", True)):
        splits = D.load_splits("synthetic", "unused", vit, a.images)
        aug = D.augment_for("cifar10", vit, True)
        splits.train.transform = D.build_transforms("cifar10", vit, True)
        sampler = D.EpochSampler(len(splits.train))
        cpu = images_per_second(D.make_loader(splits.train, a.batch, a.workers, sampler, True), device)
        gpu = images_per_second(D.DeviceLoader(splits.train, aug, a.batch, device, sampler, True), device)
        lines.append(f"| {family} | {cpu:,.0f} | {gpu:,.0f} | {gpu / cpu:.1f}x |")
        print(lines[-1], flush=True)
    if a.record:
        record("GPU-resident loader vs CPU DataLoader", "python " + " ".join(sys.argv), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
