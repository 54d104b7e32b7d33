"""Loaders: the epoch order, the CPU DataLoader, and batched augmentation of in-memory data.

In-memory datasets (CIFAR, digits, synthetic) are augmented in whole batches by `DeviceLoader`,
on the GPU (data resident there as uint8) or on the CPU: per-image random crop and flip in a few
gather ops, TrivialAugment with one op per group of images. Folder datasets go through a
DataLoader with workers and per-sample transforms. Either way an epoch's order and randomness
come from (epoch seed, position, rank) alone, so a resumed run continues exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from dataset import Augment, DataSplits, ImageTensors, augment_for


class EpochSampler(Sampler[int]):
    """Shuffled indices from `set_epoch(seed)` alone, sharded over `world` ranks (equal shards),
    optionally starting `start` samples into the rank's order (a resumed epoch)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world
        self.seed, self.start = 0, 0

    def set_epoch(self, seed: int, start: int = 0) -> None:
        self.seed, self.start = seed, start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        shard = perm[: self.n // self.world * self.world][self.rank :: self.world]
        return iter(shard[self.start :].tolist())

    def __len__(self) -> int:
        return self.n // self.world - self.start


class ShardSampler(Sampler[int]):
    """Evaluation order: rank r of `world` reads samples r, r + world, ... (every sample once
    over all ranks, no padding), so summed metrics are exactly those of the whole set."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    ds: Dataset,
    batch_size: int,
    workers: int,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """A DataLoader in `sampler` order (sequential without one). `persistent`: workers live across
    epochs (the training loader: our datasets read the epoch seed from shared memory, see
    dataset.SeededTransforms); evaluation loaders' workers end after each pass, so they hold no
    memory or processes during training."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=persistent and workers > 0,
    )


def calibration_batches(ds: Dataset, batches: int, batch_size: int, seed: int) -> list:
    """`batches` fixed batches of un-augmented training images for activation criteria."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[: batches * batch_size].tolist()
    out = []
    for b in range(0, len(idx), batch_size):
        items = [ds[i] for i in idx[b : b + batch_size]]
        out.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return out


# ------------------------------------------------------------------ GPU-resident loader
def crop_flip_params(b: int, pad: int, flip: bool, g: torch.Generator) -> tuple:
    """(row offsets, column offsets, mirror flags) of `b` images, drawn from `g` (CPU) in this
    order; offsets None without padding, flags None without flips."""
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g) if pad else None
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g) if pad else None
    mirror = torch.rand(b, generator=g) < 0.5 if flip else None
    return oy, ox, mirror


def crop_flip(x: torch.Tensor, pad: int, oy, ox, mirror) -> torch.Tensor:
    """Crop (zero padding `pad`, window at offsets oy, ox) and flip (where `mirror`) a uint8 batch
    [B, C, H, W], per image, in a few whole-batch ops; the parameters live on x's device."""
    b, c, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * pad)
        x = xp.gather(2, rows)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
        x = x.gather(3, cols)
    if mirror is not None:
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


class DeviceLoader:
    """Batches of an in-memory uint8 dataset kept on the device, augmented there as whole
    batches (airbench-style): no worker processes, no host-to-device copies per step.

    The order comes from `sampler` (so resume and sharding behave as with the DataLoader);
    crop/flip randomness is seeded per (epoch seed, batch, rank), so ranks draw different
    augmentations. `epoch_plan` makes an epoch's order and crop/flip parameters at its start and
    moves them to the device in one copy, so a step never waits on the host. TrivialAugment, when
    the recipe asks for it, is applied with one op per group of `trivial_group` images.
    """

    def __init__(
        self,
        ds: ImageTensors,
        aug: Augment,
        batch_size: int,
        device: torch.device,
        sampler: Sampler | None = None,
        drop_last: bool = False,
        trivial_group: int = 8,
        rank: int = 0,
    ):
        self.images = ds.images.to(device)
        self.labels = ds.labels.to(device)
        self.ds, self.aug, self.batch_size, self.device = ds, aug, batch_size, device
        self.sampler, self.drop_last, self.trivial_group, self.rank = sampler, drop_last, trivial_group, rank
        self.mean = torch.tensor(aug.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(aug.std, device=device).view(1, 3, 1, 1) * 255
        self.trivial = v2.TrivialAugmentWide() if aug.trivial else None

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_seed(self, b: int) -> int:
        """The seed of batch `b` of this epoch (counted from the epoch's start, also on resume)."""
        start = getattr(self.sampler, "start", 0) // self.batch_size
        return (self.ds.epoch_seed * 1_000_003 + start + b + self.rank * 0x9E3779B97F4A7C15) % (2**63)

    def epoch_plan(self) -> torch.Tensor:
        """This epoch's batches as one int64 tensor [4, n] on the device: sample indices, row and
        column crop offsets, mirror flags (one column per sample, batch after batch). Drawn on the
        CPU exactly as per batch (the same numbers), then copied once (pinned, non-blocking)."""
        order = torch.tensor(list(self.sampler) if self.sampler is not None else range(len(self.labels)))
        order = order[: len(self) * self.batch_size]
        plan = torch.zeros(4, len(order), dtype=torch.int64)
        plan[0] = order
        for b in range(len(self) if self.aug.pad or self.aug.flip else 0):  # evaluation: no draws
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, len(order))
            oy, ox, mirror = crop_flip_params(
                hi - lo, self.aug.pad, self.aug.flip, torch.Generator().manual_seed(self.batch_seed(b))
            )
            for row, p in ((1, oy), (2, ox), (3, mirror)):
                if p is not None:
                    plan[row, lo:hi] = p
        if self.device.type == "cuda":
            return plan.pin_memory().to(self.device, non_blocking=True)
        return plan.to(self.device)

    def __iter__(self):
        plan = self.epoch_plan()
        pad = self.aug.pad
        for b in range(len(self)):
            idx, oy, ox, mirror = plan[:, b * self.batch_size : (b + 1) * self.batch_size]
            x = crop_flip(self.images[idx], pad, oy, ox, mirror.bool() if self.aug.flip else None)
            if self.trivial is not None:
                with torch.random.fork_rng(devices=[]):  # TrivialAugment draws from the CPU generator
                    torch.default_generator.manual_seed(self.batch_seed(b))
                    x = torch.cat([self.trivial(part) for part in x.split(self.trivial_group)])
            yield (x.float() - self.mean) / self.std, self.labels[idx]


def build_loaders(
    data: DataSplits,
    dataset: str,
    strong: bool,
    device: torch.device,
    sampler: Sampler,
    batch_size: int,
    eval_batch_size: int,
    workers: int,
    batched: bool = True,
    rank: int = 0,
    world: int = 1,
) -> tuple:
    """(train, val, test) loaders. In-memory data: `DeviceLoader`s on `device` (GPU-resident on
    CUDA, batched on the CPU) unless `batched` is False; folder data: DataLoaders with workers.
    Each rank evaluates its shard of val and test (`ShardSampler`)."""
    drop_last = len(sampler) >= 2 * batch_size
    shard = lambda ds: ShardSampler(len(ds), rank, world)
    if batched and isinstance(data.train, ImageTensors):
        aug, plain = augment_for(dataset, strong, True), augment_for(dataset, strong, False)
        return (
            DeviceLoader(data.train, aug, batch_size, device, sampler, drop_last, rank=rank),
            DeviceLoader(data.val, plain, eval_batch_size, device, shard(data.val)),
            DeviceLoader(data.test, plain, eval_batch_size, device, shard(data.test)),
        )
    return (
        make_loader(data.train, batch_size, workers, sampler, drop_last, persistent=True),
        make_loader(data.val, eval_batch_size, workers, shard(data.val)),
        make_loader(data.test, eval_batch_size, workers, shard(data.test)),
    )
