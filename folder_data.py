"""Image folders on disk (`--dataset imagenet` / `folder`): scan and check, the fixed validation
hold-out, decoding, and the ImageNet-style transforms.

Layout (torchvision ImageFolder): DATA/train/<class>/<image>, DATA/val/<class>/<image>, and for
`folder` an optional DATA/test/<class>/<image>. Classes are the sorted sub-folder names and must
be the same in every split. Model selection never sees the reported test split: validation is
a fixed, stratified hold-out of train/ (VAL_PER_CLASS images of each class, at most a fifth of
a small class), and val/ (or test/ when present, `folder` only) is the test set.

Nothing is loaded into memory but the file list, kept as one numpy byte array (no Python object
per image for DataLoader workers to copy); images are decoded and transformed per sample in the
workers. Decoding uses torchvision.io (libjpeg-turbo; faster than PIL on our CPUs, see
bench/bench_folder.py), with PIL for the formats it does not read.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms import v2

from errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm", ".tif", ".tiff")
VAL_PER_CLASS = 10  # images of each class held out of train/ for validation
DEFAULT_IMG_SIZE = 224
EVAL_CROP = 0.875  # eval: resize to img_size / 0.875, center crop img_size (the ImageNet convention)
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SPLIT_SEED = 0


@dataclass
class FileList:
    """Image files under `root` (relative paths as one fixed-width byte array) and labels, with a
    flag per file found unreadable (shared memory: loader workers set it, the main process counts)."""

    root: str
    paths: np.ndarray  # dtype S<n>
    labels: np.ndarray  # int64
    unreadable: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.unreadable = torch.zeros(len(self.labels), dtype=torch.uint8).share_memory_()

    @classmethod
    def from_samples(cls, root: str, samples: list[tuple[str, int]]) -> FileList:
        rel = [os.path.relpath(p, root).encode() for p, _ in samples]
        return cls(root, np.array(rel, dtype=bytes), np.array([y for _, y in samples], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> FileList:
        idx = np.asarray(idx, dtype=np.int64)
        return FileList(self.root, self.paths[idx], self.labels[idx])

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def read(self, i: int) -> tuple[int, torch.Tensor]:
        """(j, image j): image i, or where it is unreadable the next readable image of the split
        (wrapping), so a batch keeps its size and the choice depends on the files alone. Each
        unreadable file is flagged and named in one warning (per process that finds it)."""
        for k in range(len(self)):
            j = (i + k) % len(self)
            if self.unreadable[j]:
                continue
            try:
                return j, read_image(self.path(j))
            except Exception as e:  # any decoder's error: a truncated, corrupt or mislabelled file
                self.unreadable[j] = 1
                print(
                    f"warning: unreadable image {self.path(j)} ({type(e).__name__}): skipped, the next readable "
                    "image of the split takes its place",
                    file=sys.stderr,
                    flush=True,
                )
        raise DataError(f"{self.root}: no image of this split is readable")


# ------------------------------------------------------------------------------ scan
def _images_of(folder: str) -> list[str]:
    """Image files under `folder` (recursively), relative to it, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        out += [
            os.path.normpath(os.path.join(rel, f))
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    return out


def scan_split(split_dir: str, flag: str) -> tuple[list[str], FileList]:
    """The class names (sorted sub-folders) of one split and its images; DataError for a missing
    folder, no class folders, or a class folder without images."""
    if not os.path.isdir(split_dir):
        raise DataError(f"{flag}: {split_dir} not found (expected <split>/<class>/<image> with train/ and val/)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{flag}: {split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        files = _images_of(os.path.join(split_dir, name))
        if not files:
            raise DataError(
                f"{flag}: class folder {os.path.join(split_dir, name)} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        samples += [(os.path.join(split_dir, name, f), label) for f in files]
    return classes, FileList.from_samples(split_dir, samples)


def _same_classes(train: list[str], other: list[str], other_dir: str, flag: str) -> None:
    if train != other:
        missing, extra = sorted(set(train) - set(other)), sorted(set(other) - set(train))
        show = lambda names: ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        raise DataError(
            f"{flag}: the classes of {other_dir} differ from train/ "
            f"(missing: {show(missing) or 'none'}; extra: {show(extra) or 'none'})"
        )


def holdout(labels: np.ndarray, per_class: int = VAL_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: min(per_class, n_c // 5) random images of each class go to val, the
    same ones every run (seeded by SPLIT_SEED, independent of --seed)."""
    rng = random.Random(SPLIT_SEED)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c).tolist()
        val += rng.sample(idx, min(per_class, len(idx) // 5))
    val_idx = np.array(sorted(val), dtype=np.int64)
    keep = np.ones(len(labels), dtype=bool)
    keep[val_idx] = False
    return np.flatnonzero(keep), val_idx


def scan_folder(name: str, root: str) -> tuple[list[str], FileList, FileList, FileList]:
    """(classes, train, val, test) file lists of an image folder dataset, checked."""
    flag = f"--dataset {name} --data {root}"
    if not os.path.isdir(root):
        raise DataError(f"{flag}: folder not found")
    classes, files = scan_split(os.path.join(root, "train"), flag)
    test_dir = os.path.join(root, "test" if name == "folder" and os.path.isdir(os.path.join(root, "test")) else "val")
    test_classes, test = scan_split(test_dir, flag)
    _same_classes(classes, test_classes, os.path.basename(test_dir) + "/", flag)
    tr_idx, va_idx = holdout(files.labels)
    if len(va_idx) == 0:
        raise DataError(f"{flag}: too few training images to hold out a validation set (a class needs >= 5)")
    return classes, files.subset(tr_idx), files.subset(va_idx), test


# ---------------------------------------------------------------------------- decode
def read_image(path: str) -> torch.Tensor:
    """uint8 RGB [3, H, W] of an image file: torchvision.io (JPEG, PNG, WebP, GIF), else PIL."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError:  # a format torchvision does not decode (BMP, TIFF, ...)
        from PIL import Image

        with Image.open(path) as im:
            return v2.functional.pil_to_tensor(im.convert("RGB"))


# ------------------------------------------------------------------------ transforms
def folder_transforms(img_size: int, strong: bool, train: bool, norm: tuple | None = None):
    """Train: RandomResizedCrop, flip, TrivialAugmentWide when `strong` (the ViT recipe); eval:
    resize to img_size / 0.875 and center crop. Then float and normalize (`norm` = (mean, std),
    default ImageNet's; a timm arch brings its pretrained weights' own)."""
    mean, std = norm or IMAGENET_NORM
    if train:
        ops = [v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip()]
        ops += [v2.TrivialAugmentWide()] if strong else []
    else:
        ops = [v2.Resize(int(round(img_size / EVAL_CROP)), antialias=True), v2.CenterCrop(img_size)]
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
