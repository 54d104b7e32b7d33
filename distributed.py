"""torchrun support: process group setup, rank helpers, and collective utilities.

`torchrun --nproc_per_node=N main_imp_fillback.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
training then runs under DistributedDataParallel (NCCL on GPU, gloo on CPU). One process
without those variables is the ordinary single-device run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group when launched by torchrun; otherwise a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


def select_device(device: str, d: Dist, deterministic: bool = False) -> torch.device:
    """`--device` resolved (auto: CUDA when present), each rank on its local GPU. `deterministic`
    asks for deterministic kernels (bit-exact GPU resumes, slower)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and d.enabled:
        return torch.device("cuda", d.local_rank)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:  # cuda:N: N is also the current device (libraries, caches)
        torch.cuda.set_device(dev)
    return dev


def wrap_for_training(model: torch.nn.Module, d: Dist, device: torch.device, compile: bool) -> torch.nn.Module:
    """The module the training step calls: DistributedDataParallel under torchrun, then
    torch.compile when asked (backend from RSST_COMPILE_BACKEND, default inductor)."""
    net = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if compile:
        net = torch.compile(net, backend=os.environ.get("RSST_COMPILE_BACKEND", "inductor"))
    return net


def from_main(obj, device: str):
    """Rank 0's `obj` (picklable) on every rank, joining the process group first (the run's name
    and folder, whose timestamp each process takes itself); `obj` itself on one process."""
    d = init_distributed(device)
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of `t` over ranks (a copy; `t` itself on one process)."""
    if not d.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_max(t: torch.Tensor, d: Dist, device: torch.device) -> torch.Tensor:
    """Elementwise maximum of `t` over ranks, on the CPU (`t` itself on one process)."""
    if not d.enabled:
        return t
    t = t.to(device, copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()


def broadcast_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Make every rank hold rank 0's buffers (BatchNorm running statistics), in place: each rank
    updates its own in its training forwards, and an evaluation must be that of the model rank 0
    saves."""
    if d.enabled:
        for b in model.buffers():
            dist.broadcast(b, 0)


def broadcast_masks(masks: dict[str, torch.Tensor], d: Dist) -> None:
    """Make every rank hold rank 0's masks (in place). Each mask must own contiguous memory (a
    stride-0 expanded view would receive into memory it shares); bool masks travel as uint8."""
    if not d.enabled:
        return
    for name, m in masks.items():
        if not m.is_contiguous() or 0 in m.stride():
            raise ValueError(f"mask {name} is not contiguous: cannot receive a broadcast in place")
        dist.broadcast(m.view(torch.uint8) if m.dtype == torch.bool else m, 0)


@contextmanager
def rank_zero_first(d: Dist):
    """Rank 0 runs the block first (a download, a cache), the other ranks after it, so they never
    write the same files at once."""
    if d.enabled and not d.is_main:
        dist.barrier()
    yield
    if d.enabled and d.is_main:
        dist.barrier()


def max_over_ranks(value: int, d: Dist, device: torch.device) -> int:
    """The largest `value` over ranks (the signal that stops every rank at the same step, 0:
    none; a signal number, not a flag, so every process exits with the code of the one received)."""
    return int(all_max(torch.tensor(value, dtype=torch.int64), d, device))


def gather_to_main(obj, d: Dist) -> list | None:
    """Every rank's `obj` (picklable, sent between this run's own processes) as a list on rank 0,
    None on the other ranks; `[obj]` on one process."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist | None = None) -> None:
    """Leave the process group (`d` None: whichever this process joined)."""
    if (d is None or d.enabled) and dist.is_initialized():
        dist.destroy_process_group()
