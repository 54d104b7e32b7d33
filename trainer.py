"""Training recipes, one epoch of training, evaluation.

Recipes (docs/training.md "Training recipes" cites the sources):
- CNN (ResNets, VGG): SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, lr x0.1 at 50 %
  and 75 % of the state's steps (open_lth's cifar_resnet_20 schedule, scaled to --epochs).
- ViT: AdamW lr 1e-3, weight decay 0.05, linear warmup (5 epochs, at most 1/8 of the state),
  cosine decay, label smoothing 0.1, TrivialAugment + crop/flip, mixup 0.8 / cutmix 1.0,
  stochastic depth 0.1 (the "ViT for small datasets" recipe, without repeated augmentation).
- ViT from pretrained weights (--pretrained_file, --vit_pretrained): fine-tuning, AdamW lr 1e-4,
  weight decay 0.05, warmup 1 epoch (at most 1/8 of the state), cosine, label smoothing 0.1,
  no mixup/cutmix (docs/own-data.md "Fine-tuning recipe" gives the sources).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

RECIPES = {
    "cnn": dict(
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        warmup=0.0,
        lr_schedule="step",
        label_smoothing=0.0,
        mixup=0.0,
        cutmix=0.0,
    ),
    "vit": dict(
        optimizer="adamw",
        lr=1e-3,
        momentum=0.9,
        weight_decay=0.05,
        warmup=5.0,
        lr_schedule="cosine",
        label_smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
    ),
    "vit_finetune": dict(
        optimizer="adamw",
        lr=1e-4,
        momentum=0.9,
        weight_decay=0.05,
        warmup=1.0,
        lr_schedule="cosine",
        label_smoothing=0.1,
        mixup=0.0,
        cutmix=0.0,
    ),
}


def fill_recipe(args, family) -> None:
    """Set every recipe flag left at None (not given) to the default of `family`'s recipe
    (cnn, vit, or vit_finetune for a ViT that starts from pretrained weights)."""
    recipe = dict(RECIPES[family.recipe_name(args)])
    if args.augment == "light":  # crop and flip only
        recipe.update(mixup=0.0, cutmix=0.0)
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if recipe["warmup"] and args.warmup == recipe["warmup"]:  # at most 1/8 of a short state
        args.warmup = float(min(args.warmup, args.epochs // 8))


def mixup_fn(mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
    """timm's Mixup/CutMix (soft, label-smoothed targets), or None when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or Inf loss."""


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases, norms, and position/class tokens."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    raise ValueError(f"unknown optimizer {name!r}")


def parse_milestones(decreasing_lr: str | None) -> list[int] | None:
    """`--decreasing_lr` "40,60" as epochs [40, 60] (None: the recipe's 50 %/75 % default)."""
    return None if decreasing_lr is None else [int(e) for e in str(decreasing_lr).split(",")]


def lr_factor(step: int, total: int, warmup: int, schedule: str, milestones: list[int]) -> float:
    """Multiplier of the base lr at optimizer step `step`: warmup, then cosine or steps x0.1."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return 0.1 ** sum(step >= m for m in milestones)


def build_scheduler(
    optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float, schedule: str, decreasing_lr: list[int] | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR over one state of `epochs` epochs. Step milestones are the epochs
    in `decreasing_lr`, or 50 % and 75 % of the state's steps when it is None."""
    total, warmup = steps_per_epoch * epochs, int(round(warmup_epochs * steps_per_epoch))
    if decreasing_lr is None:
        milestones = [total // 2, total * 3 // 4]
    else:
        milestones = [e * steps_per_epoch for e in decreasing_lr]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, schedule, milestones))


def native_bf16(device: torch.device) -> bool:
    """True where `device` computes bf16 natively: a CUDA GPU of compute capability >= 8 (Ampere
    on). `torch.cuda.is_bf16_supported()` also counts emulation (V100, T4), which is slow."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def amp_dtype(mode: str, device: torch.device, force_cpu: bool = False) -> torch.dtype | None:
    """The autocast dtype of `--amp` on `device` (None: fp32). auto: bf16 where the GPU computes
    it natively (`native_bf16`), else fp16 (with loss scaling: see `grad_scaler`); on the CPU fp32, or bf16 when the GPU
    code paths are forced (tests)."""
    if mode == "off":
        return None
    if device.type != "cuda":
        return torch.bfloat16 if force_cpu else None
    if mode == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast; a disabled (pass-through) scaler otherwise."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer,
    scheduler,
    device: torch.device,
    after_step: Callable[[], bool],
    label_smoothing: float = 0.0,
    mixup_fn=None,
    desc: str = "",
    totals: dict | None = None,
    reduce: Callable = lambda t: t,
    amp: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """One epoch (or the rest of one: `totals` carries the sums of its finished steps).

    `after_step` runs after every optimizer step (RSST penalty, mask re-apply) and returns True
    to stop early (a signal): the result then has "stopped" set and the partial sums.
    `reduce` sums the loss/accuracy tensors over ranks (identity on one process). `amp` is the
    autocast dtype (None: fp32); `scaler` scales fp16 losses.
    """
    scaler = scaler or grad_scaler(None)
    model.train()
    totals = dict(totals or {"loss_sum": 0.0, "correct": 0.0, "seen": 0, "steps": 0})
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, steps, stopped, lr = 0, 0, False, optimizer.param_groups[0]["lr"]
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        target = y
        if mixup_fn is not None and len(y) % 2 == 0:
            x, target = mixup_fn(x, y)
        with _autocast(device, amp):
            out = model(x)
        if target.dim() == 2:  # soft targets from mixup/cutmix (already label-smoothed)
            loss = torch.sum(-target * F.log_softmax(out.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(out.float(), target, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen, steps = seen + len(y), steps + 1
        if after_step():
            stopped = True
            break
    sums = reduce(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)]))
    totals = {
        "loss_sum": totals["loss_sum"] + float(sums[0]),
        "correct": totals["correct"] + float(sums[1]),
        "seen": totals["seen"] + int(sums[2]),
        "steps": totals["steps"] + steps,
    }
    loss = totals["loss_sum"] / max(1, totals["seen"])
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"training loss is {loss}")
    return {
        "loss": loss,
        "acc": 100.0 * totals["correct"] / max(1, totals["seen"]),
        "lr": lr,
        "stopped": stopped,
        "totals": totals,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, amp: torch.dtype | None = None, reduce: Callable = lambda t: t
) -> dict:
    """Mean cross-entropy and top-1 accuracy (%) on `loader` (this rank's shard; `reduce` sums
    the shards of all ranks)."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
    sums = reduce(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)]))
    return {"loss": float(sums[0]) / max(1.0, float(sums[2])), "acc": 100.0 * float(sums[1]) / max(1.0, float(sums[2]))}
