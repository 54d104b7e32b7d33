"""Images/s of the batched in-memory loader (loaders.DeviceLoader) against the per-sample
DataLoader path, for the CNN (crop + flip) and the ViT (crop + flip + TrivialAugment)
augmentation, on CIFAR-shaped synthetic uint8 data: on the CPU (workers 0, what digits,
synthetic and CIFAR runs use there), and on the GPU when present (data resident there).
Target (CPU): batched >= 10x per-sample.

    python bench/bench_loader.py [--images 4096] [--batch 128] [--threads 1] [--record]
"""

from __future__ import annotations

import shlex
import sys
import time

from common import apply_threads, bench_parser, machine, record

import torch

import dataset as D  # noqa: E402  (common puts the repository root on sys.path)
import loaders as L  # noqa: E402


def images_per_second(loader, device: torch.device, epochs: int = 2) -> float:
    """Throughput of iterating `loader` with every batch on `device` (no model)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, t0 = 0, None
    for e in range(epochs + 1):  # the first epoch warms up
        if e == 1:
            sync()
            t0 = time.perf_counter()
        getattr(loader, "ds", getattr(loader, "dataset", None)).epoch_seed = e  # a new epoch's augmentation
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            n += len(x) if e else 0
    sync()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args(argv)
    apply_threads(a.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines = ["| device | augmentation | per-sample img/s | batched img/s | speedup |", "|---|---|---|---|---|"]
    print(machine())
    for device in devices:
        for family, strong in (("CNN (crop+flip)", False), ("ViT (crop+flip+TrivialAugment)", True)):
            splits = D.load_splits("synthetic", "unused", strong, a.images)
            splits.train.transform = D.build_transforms("cifar10", strong, True)  # synthetic has no augmentation
            aug = D.augment_for("cifar10", strong, True)
            sampler = L.EpochSampler(len(splits.train))
            per_sample = images_per_second(L.make_loader(splits.train, a.batch, 0, sampler, True), device)
            batched = images_per_second(L.DeviceLoader(splits.train, aug, a.batch, device, sampler, True), device)
            lines.append(
                f"| {device.type} | {family} | {per_sample:,.0f} | {batched:,.0f} | {batched / per_sample:.1f}x |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        f"{a.images} images 32x32, batch {a.batch}, per-sample path with 0 workers (seeded per sample), "
        "2 timed epochs after one warm-up epoch.",
    ]
    if a.record:
        record(
            "Batched in-memory loader vs per-sample path",
            "python bench/bench_loader.py " + shlex.join(sys.argv[1:]),
            lines,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
