"""Datasets, transforms and loaders.

cifar10 / cifar100: train 45k / val 5k held out from train (fixed split) / test 10k; the test
set is never used to pick a model. tiny_imagenet: read from `DATA/tiny-imagenet-200` (train
90k / val 10k held out / the official val set as test). digits: scikit-learn's bundled 8x8
handwritten digits (a real dataset, no download) upscaled to 32x32x3, fixed stratified split
60/20/20. synthetic: small, learnable class templates plus noise, for tests. imagenet / folder:
image folders on disk (train/ val/ [test/]), read per sample; see folder_data.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from errors import DataError
from folder_data import DEFAULT_IMG_SIZE, FileList, folder_transforms, scan_folder

DATASETS = ("cifar10", "cifar100", "digits", "synthetic", "tiny_imagenet", "imagenet", "folder")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10, "synthetic": 10, "tiny_imagenet": 200}
IMG_SIZE = {"cifar10": 32, "cifar100": 32, "digits": 32, "synthetic": 32, "tiny_imagenet": 64}
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
SPLIT_SEED = 0  # the train/val split is fixed, independent of --seed


class SeededTransforms(Dataset):
    """Base of our datasets: sample i's random augmentation is seeded by (epoch_seed, i), so an
    epoch's data is the same whichever worker loads it and wherever a run resumes. The epoch
    seed lives in shared memory: persistent DataLoader workers see each new epoch's seed."""

    def __init__(self):
        self._seed = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch_seed(self) -> int:
        return int(self._seed)

    @epoch_seed.setter
    def epoch_seed(self, value: int) -> None:
        self._seed.fill_(value)

    def _apply(self, i: int, img):
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: CUDA streams stay untouched
            torch.default_generator.manual_seed((self.epoch_seed * 1_000_003 + i) % (2**63))
            return self.transform(img)


class ImageTensors(SeededTransforms):
    """uint8 images [N, 3, H, W] with labels, transformed per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        super().__init__()
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self._apply(i, self.images[i]), int(self.labels[i])


@dataclass
class DataSplits:
    train: Dataset  # training transform (augmentation)
    train_plain: Dataset  # the same images, evaluation transform (for calibration batches)
    val: Dataset
    test: Dataset
    num_classes: int
    img_size: int


@dataclass(frozen=True)
class Augment:
    """The training augmentation of a dataset and model family (per-sample or whole-batch)."""

    size: int
    pad: int  # random crop with this zero padding (0: none)
    flip: bool  # random horizontal flip
    trivial: bool  # TrivialAugmentWide (ViT recipe)
    mean: tuple
    std: tuple


def augment_for(dataset: str, strong: bool, train: bool) -> Augment:
    """The training (or evaluation) transform of `dataset`; `strong` adds TrivialAugment (the
    ViT recipe)."""
    size = IMG_SIZE[dataset]
    mean, std = MEAN_STD.get(dataset, ((0.5,) * 3, (0.5,) * 3))
    if not train or dataset == "synthetic":
        return Augment(size, 0, False, False, mean, std)
    pad = 2 if dataset == "digits" else size // 8
    # digits are not mirror-symmetric; small-data ViTs need strong augmentation (RECIPES.md)
    return Augment(size, pad, dataset != "digits", strong, mean, std)


def build_transforms(dataset: str, strong: bool, train: bool):
    """Per-sample transform on uint8 images (or PIL): augmentation, then float + normalize."""
    aug = augment_for(dataset, strong, train)
    ops = [v2.ToImage()]
    if aug.pad:
        ops.append(v2.RandomCrop(aug.size, padding=aug.pad))
    if aug.flip:
        ops.append(v2.RandomHorizontalFlip())
    if aug.trivial:
        ops.append(v2.TrivialAugmentWide())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std)]
    return v2.Compose(ops)


def _split(n: int, n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[n_val:], perm[:n_val]


def _cifar(name: str, root: str):
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    existed = os.path.isdir(root)
    try:
        sets = [cls(root, train=t, download=False) for t in (True, False)]
    except RuntimeError:
        try:
            sets = [cls(root, train=t, download=True) for t in (True, False)]
        except Exception as e:  # no network, disk full, corrupt archive
            if not existed and os.path.isdir(root) and not os.listdir(root):
                os.rmdir(root)  # leave no empty data folder behind
            raise DataError(
                f"--dataset {name}: not found in {root}/{folder} and download failed "
                f"({type(e).__name__}); fetch {cls.url} and extract it into {root}/, "
                "or try --dataset digits (bundled, no download)"
            ) from None
    as_tensors = lambda d: (
        torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
        torch.tensor(d.targets, dtype=torch.long),
    )
    (xtr, ytr), (xte, yte) = as_tensors(sets[0]), as_tensors(sets[1])
    return xtr, ytr, xte, yte, 5000


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    rest, test = train_test_split(idx, test_size=0.2, stratify=y.numpy(), random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=0.25, stratify=y.numpy()[rest], random_state=SPLIT_SEED)
    return [(x[torch.from_numpy(i)], y[torch.from_numpy(i)]) for i in (train, val, test)]


def _synthetic(n_train: int, num_classes: int = 10, size: int = 32):
    """Class templates (smooth random patterns) plus per-image noise and brightness jitter."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    templates = F.interpolate(
        torch.randn(num_classes, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False
    )
    sizes = (n_train, max(32, n_train // 4), max(32, n_train // 4))
    out = []
    for n in sizes:
        y = torch.arange(n) % num_classes
        noise = torch.randn(n, 3, size, size, generator=g)
        shift = 0.3 * torch.randn(n, 1, 1, 1, generator=g)
        x = 128 + 50 * (templates[y] + 0.8 * noise + shift)
        out.append((x.clamp(0, 255).round().to(torch.uint8), y))
    return out


def _tiny_imagenet(root: str):
    from torchvision.datasets import ImageFolder

    base = os.path.join(root, "tiny-imagenet-200")
    train_dir, val_dir = os.path.join(base, "train"), os.path.join(base, "val")
    ann = os.path.join(val_dir, "val_annotations.txt")
    if not (os.path.isdir(train_dir) and os.path.isfile(ann)):
        raise DataError(
            f"--dataset tiny_imagenet: {base}/train and {base}/val/val_annotations.txt "
            "not found; download tiny-imagenet-200.zip and unzip it into "
            f"{root}/ (it cannot be fetched automatically)"
        )
    train = ImageFolder(train_dir)
    with open(ann) as f:
        rows = [line.split("\t")[:2] for line in f if line.strip()]
    test = [(os.path.join(val_dir, "images", name), train.class_to_idx[wnid]) for name, wnid in rows]
    return FileList.from_samples(train_dir, train.samples), FileList.from_samples(val_dir, test)


class FileImages(SeededTransforms):
    """Images read from disk per sample: decoded and transformed in the loader's workers."""

    def __init__(self, files: FileList, transform):
        super().__init__()
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        j, img = self.files.read(i)  # j != i: image i is unreadable (FileList.read)
        return self._apply(i, img), int(self.files.labels[j])


def _image_folder(name: str, root: str, strong: bool, img_size: int, norm: tuple | None) -> DataSplits:
    classes, train, val, test = scan_folder(name, root)
    tr, ev = (folder_transforms(img_size, strong, t, norm) for t in (True, False))
    return DataSplits(
        FileImages(train, tr), FileImages(train, ev), FileImages(val, ev), FileImages(test, ev), len(classes), img_size
    )


def load_splits(
    name: str,
    root: str,
    strong: bool,
    synthetic_size: int = 512,
    img_size: int | None = None,
    norm: tuple | None = None,
) -> DataSplits:
    """The train / val / test splits of dataset `name` with the recipe's transforms. Image
    folders (imagenet, folder) take `img_size` (default 224) and `norm` = (mean, std)."""
    if name not in DATASETS:
        raise DataError(f"--dataset {name!r} is unknown; choose from {', '.join(DATASETS)}")
    if name in ("imagenet", "folder"):
        return _image_folder(name, root, strong, img_size or DEFAULT_IMG_SIZE, norm)
    tr, ev = build_transforms(name, strong, True), build_transforms(name, strong, False)
    if name == "tiny_imagenet":
        train, test = _tiny_imagenet(root)
        tr_idx, va_idx = (i.numpy() for i in _split(len(train), 10000))
        return DataSplits(
            FileImages(train.subset(tr_idx), tr),
            FileImages(train.subset(tr_idx), ev),
            FileImages(train.subset(va_idx), ev),
            FileImages(test, ev),
            200,
            64,
        )
    if name in ("cifar10", "cifar100"):
        xtr, ytr, xte, yte, n_val = _cifar(name, root)
        tr_idx, va_idx = _split(len(ytr), n_val)
        parts = [(xtr[tr_idx], ytr[tr_idx]), (xtr[va_idx], ytr[va_idx]), (xte, yte)]
    elif name == "digits":
        parts = _digits()
    else:
        parts = _synthetic(synthetic_size)
    (xa, ya), (xv, yv), (xt, yt) = parts
    return DataSplits(
        ImageTensors(xa, ya, tr),
        ImageTensors(xa, ya, ev),
        ImageTensors(xv, yv, ev),
        ImageTensors(xt, yt, ev),
        NUM_CLASSES[name],
        IMG_SIZE[name],
    )
