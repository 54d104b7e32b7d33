"""Run files and process state: the save-dir lock, atomic saves, the resume choice, signals, RNG.

Everything a run needs to survive a kill: an exclusive lock on the save dir for the life of the
run; checkpoints written to a per-process temporary file, fsynced and renamed (a failed write
leaves no partial file and raises `SaveError`); the newest readable checkpoint for `--resume`;
SIGINT/SIGTERM turned into a clean stop at a step boundary; and every RNG stream (each rank's),
saved as plain data and restored for an exact continuation. Every file is read with
weights_only=True: a checkpoint carrying pickled code is refused, never run.
"""

from __future__ import annotations

import fcntl
import glob
import os
import pickle
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import yaml

from errors import UsageError

OUTPUT_GLOBS = (
    "*checkpoint.pth.tar",
    "*model_SA_best.pth.tar",
    "latest.pth.tar",
    "rewind.pth.tar",
    "init.pth.tar",
    "summary.csv",
    "summary.json",
    "args.yaml",
    "*.png",
)
STATE_FILE = re.compile(r"(\d+)checkpoint\.pth\.tar")


class SaveError(OSError):
    """A run file could not be written (disk full, permissions): exit code 1."""


# ------------------------------------------------------------------------- save dir
class RunDir:
    """An exclusive `fcntl.flock` on `DIR/.lock`, held for the life of a run (the kernel drops
    it when the process dies, even by SIGKILL). `release(failed=True)` also removes a save dir
    this run created and left empty."""

    def __init__(self, path: str, create: bool = True):
        self.path = path
        self.created = not os.path.isdir(path)
        if self.created and not create:
            raise UsageError(f"--resume: nothing to resume, {path} does not exist")
        try:
            os.makedirs(path, exist_ok=True)
            self.fd = open(os.path.join(path, ".lock"), "a+")
        except OSError as e:
            raise UsageError(f"--save_dir {path}: cannot write ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fd.seek(0)
            holder = self.fd.read().strip() or "unknown process"
            self.fd.close()
            raise UsageError(
                f"--save_dir {path}: in use by another run ({holder}); wait for it to end or use another --save_dir"
            ) from None
        self.fd.seek(0)
        self.fd.truncate()
        self.fd.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.fd.flush()
        for leftover in glob.glob(os.path.join(path, "*.tmp")):  # from a killed run: never complete
            os.remove(leftover)
        self.found = set(os.listdir(path))  # what this run did not write

    def release(self, failed: bool = False) -> None:
        """Unlock. `failed`: a new run stopped before its first checkpoint; the args.yaml and
        init.pth.tar it wrote go, and the dir too when this run created it."""
        if self.fd.closed:
            return
        if failed and not glob.glob(os.path.join(self.path, "*checkpoint.pth.tar")):
            for name in ("args.yaml", "init.pth.tar"):
                if name not in self.found and os.path.isfile(os.path.join(self.path, name)):
                    os.remove(os.path.join(self.path, name))
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.fd.close()
        if failed and self.created and os.listdir(self.path) == [".lock"]:
            os.remove(os.path.join(self.path, ".lock"))
            os.rmdir(self.path)


def find_existing_run(save_dir: str) -> list[str]:
    return sorted(f for pat in OUTPUT_GLOBS for f in glob.glob(os.path.join(save_dir, pat)))


def last_good_checkpoint(save_dir: str) -> str:
    path = os.path.join(save_dir, "latest.pth.tar")
    return path if os.path.isfile(path) else "none yet (failed in the first epoch)"


# --------------------------------------------------------------------------- writing
def write_atomic(path: str, write: Callable, mode: str = "wb") -> None:
    """Call `write(f)` on a temporary file of this process, fsync, then rename: a reader never
    sees half a file. On any failure (torch.save reports a full disk as RuntimeError) the
    temporary file is removed and `SaveError` names the file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise SaveError(f"cannot write {path} ({reason})") from None


def save_atomic(obj, path: str) -> None:
    """torch.save, atomically (see write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_yaml(path: str, data: dict) -> None:
    write_atomic(path, lambda f: yaml.safe_dump(data, f, sort_keys=True), "w")


# --------------------------------------------------------------------------- reading
class UnsafeCheckpoint(UsageError):
    """A run file that holds pickled code (a callable, a class): refused unread, exit code 2."""


def _legacy_numpy_globals() -> list:
    """numpy's array pickling, allowlisted for mid-epoch checkpoints written before the RNG
    states were stored as plain data (it rebuilds arrays only; it runs no code)."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def load_safely(path: str):
    """torch.load with weights_only=True: tensors and plain data only, so a shared checkpoint
    cannot run code on load. `UnsafeCheckpoint` names the global a file tried to load."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise UnsafeCheckpoint(
                f"{path}: refused, it holds pickled code ({found.group(1)}), not only weights and "
                "data; nothing was loaded or run"
            ) from None
        raise


def read_checkpoint(path: str) -> dict | None:
    """A checkpoint of this tool, or None (with one warning line) when it cannot be read.
    A file with pickled code raises `UnsafeCheckpoint` (never skipped silently)."""
    try:
        ck = load_safely(path)
        if isinstance(ck, dict) and "file" in ck:  # latest.pth.tar points at the last finished state
            ck = load_safely(os.path.join(os.path.dirname(path), ck["file"]))
        if isinstance(ck, dict) and "state_dict" in ck and "masks" in ck and "config" in ck:
            return ck
        raise ValueError("not a checkpoint of this tool")
    except UnsafeCheckpoint:
        raise
    except Exception as e:
        print(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__})", file=sys.stderr)
        return None


def state_checkpoints(save_dir: str) -> dict[int, str]:
    """{state: path} of the `{state}checkpoint.pth.tar` files in `save_dir`."""
    out = {}
    for path in glob.glob(os.path.join(save_dir, "*checkpoint.pth.tar")):
        match = STATE_FILE.fullmatch(os.path.basename(path))
        if match:
            out[int(match.group(1))] = path
    return out


def load_resume_checkpoint(save_dir: str, checkpoint: str | None) -> dict | None:
    """The newest readable checkpoint: `checkpoint`, else latest.pth.tar, else the highest
    {state}checkpoint.pth.tar; unreadable ones are skipped with a warning. None when the dir
    holds a run's args.yaml but no checkpoint (killed in its first epoch)."""
    if checkpoint:
        candidates = [checkpoint]
    else:
        states = state_checkpoints(save_dir)
        candidates = [os.path.join(save_dir, "latest.pth.tar")] + [states[s] for s in sorted(states, reverse=True)]
    for path in candidates:
        if os.path.isfile(path):
            ck = read_checkpoint(path)
            if ck is not None:
                return ck
    if not checkpoint and os.path.isfile(os.path.join(save_dir, "args.yaml")):
        return None
    raise UsageError(f"--resume: nothing to resume, no readable checkpoint in {checkpoint or save_dir}")


def adopt_saved_run(args, config: dict, given: set[str], skip: tuple, where: str) -> None:
    """--resume: take the saved run's config; refuse a flag given now that differs from it."""
    for key, saved in config.items():
        if key in skip or key == "save_dir" or not hasattr(args, key):
            continue
        if key in given and getattr(args, key) != saved:
            raise UsageError(
                f"--{key} {getattr(args, key)}: {where} holds a run with --{key} {saved} "
                f"({config.get('arch')}, {config.get('dataset')}, {config.get('struct')}); "
                f"resume it without --{key} or start a new run"
            )
        setattr(args, key, saved)
    missing = sorted(k for k in vars(args) if k not in config and k not in skip and k not in ("save_dir", "exp_name"))
    if missing:
        print(
            f"warning: {where} was saved by an older version; {', '.join('--' + k for k in missing)} take "
            "their current values",
            file=sys.stderr,
        )


def open_run(args, given: set[str], runtime_keys: tuple, rank: int = 0) -> dict | None:
    """With the save dir locked: the checkpoint to resume (adopting its config into `args`), or
    None for a new run, after checking that the dir holds no other run (--overwrite clears it)."""
    resume_ck = None
    if args.resume:
        resume_ck = load_resume_checkpoint(args.save_dir, args.checkpoint)
        if resume_ck is None:  # stopped in the first epoch: its args.yaml is the whole run
            try:
                with open(os.path.join(args.save_dir, "args.yaml")) as f:
                    config = yaml.safe_load(f)
                assert isinstance(config, dict)
            except (OSError, yaml.YAMLError, AssertionError):
                raise UsageError(
                    f"--resume: nothing to resume, no readable checkpoint or args.yaml in {args.save_dir}"
                ) from None
            adopt_saved_run(args, config, given, runtime_keys, args.save_dir)
            print(
                f"{args.save_dir}: no checkpoint yet (stopped in its first epoch): starting the run over",
                file=sys.stderr,
            )
            args.resume = False
        else:
            adopt_saved_run(args, resume_ck["config"], given, runtime_keys, args.checkpoint or args.save_dir)
        return resume_ck
    existing = find_existing_run(args.save_dir) if rank == 0 else []  # rank 0 may be writing args.yaml
    if existing and not args.overwrite:
        raise UsageError(
            f"--save_dir {args.save_dir} holds another run ({os.path.basename(existing[0])}); "
            "pass --resume to continue it or --overwrite to replace it"
        )
    if rank == 0:
        for f in existing:
            os.remove(f)
    return None


def copy_state(model: torch.nn.Module) -> dict:
    """A deep copy of every parameter and buffer (never aliases the live tensors)."""
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def init_weights(model: torch.nn.Module, args, resuming: bool, save: Callable) -> dict:
    """Load theta_0 into `model` (--init, --pretrained for pt, --pretrained_file, --vit_pretrained,
    or the run's own init.pth.tar when resuming; else the model's fresh init), write init.pth.tar
    through `save`, and return the rewind point theta_r (--prune_type; rewind_lt's rewind.pth.tar
    on resume)."""
    path = os.path.join(args.save_dir, "init.pth.tar")
    pt_file = args.pretrained if args.prune_type == "pt" else None  # --pretrained_file: loaded below
    source = pt_file or args.init or (path if resuming else None)
    if source == path and not os.path.isfile(path) and args.checkpoint:  # resumed into another folder
        source = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "init.pth.tar")
    if resuming and source and not os.path.isfile(source):
        raise UsageError(
            f"--resume: {os.path.basename(source)} (the run's initial weights) is missing from "
            f"{os.path.dirname(source)}; resume in the run's own folder"
        )
    if source:
        try:
            sd = torch.load(source, map_location="cpu", weights_only=True)
            model.load_state_dict(sd.get("state_dict", sd))
        except Exception as e:
            raise UsageError(f"{source}: not a weights file for --arch {args.arch} ({type(e).__name__})") from None
    elif args.pretrained_file or args.vit_pretrained:
        from models.weights import load_pretrained

        flag = f"--pretrained_file {args.pretrained_file}" if args.pretrained_file else "--vit_pretrained"
        try:
            notes = load_pretrained(model, args.arch, args.pretrained_file)
        except ValueError as e:  # the weights do not fit --arch
            raise UsageError(f"{flag}: does not fit --arch {args.arch}: {e}") from None
        except Exception as e:  # the hub cannot be reached
            raise UsageError(
                f"--vit_pretrained: cannot fetch timm ImageNet weights for {args.arch} "
                f"({type(e).__name__}); run without it or with network access"
            ) from None
        for line in notes:
            print(f"{flag}: {line}", flush=True)
    if source != path:
        save({"state_dict": model.state_dict(), "arch": args.arch}, "init.pth.tar")
    rewind = os.path.join(args.save_dir, "rewind.pth.tar")
    if args.prune_type == "rewind_lt" and resuming and os.path.isfile(rewind):
        return torch.load(rewind, map_location="cpu", weights_only=True)["state_dict"]
    return copy_state(model)


def check_resume_processes(ck: dict, world: int, save_dir: str) -> None:
    """A resumed run uses the same number of processes (exit 2 otherwise); another thread count
    is allowed but breaks bit-exactness, which one warning line says."""
    saved = ck.get("world", 1)
    if saved != world:
        raise UsageError(
            f"--resume: {save_dir} was run with {saved} process(es), this is {world}; resume it "
            f"with the same count (torchrun --nproc_per_node={saved} ...)"
        )
    if ck.get("threads") not in (None, torch.get_num_threads()):
        print(
            f"warning: resuming with {torch.get_num_threads()} CPU threads, the run used {ck['threads']}: "
            "results will not be bit-identical to an uninterrupted run (pass --threads "
            f"{ck['threads']} to match)",
            file=sys.stderr,
        )


# ------------------------------------------------------------------------------ RNG
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, state: int, epoch: int) -> int:
    """Every epoch's randomness (order, augmentation, dropout) from (seed, state, epoch) alone,
    so a run resumed at an epoch boundary continues exactly."""
    return (seed * 1_000_003 + state * 10_007 + epoch * 101 + 17) % (2**63)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random streams (dropout, drop path, augmentation): rank 0 keeps
    `seed` (a one-process run is unchanged), other ranks get their own."""
    return seed if rank == 0 else (seed + rank * 0x9E3779B97F4A7C15) % (2**63)


def rng_states(device: torch.device | None = None) -> dict:
    """Every RNG the training step draws from (dropout, drop path, mixup), for exact resume:
    the CPU streams and, on CUDA, this process's own device. Plain data (tensors, ints, a str),
    so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state(legacy=False)
    out = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
            "pos": int(np_state["state"]["pos"]),
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        },
    }
    if device is not None and device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_states(states: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(states["torch"])
    saved = states["numpy"]
    if isinstance(saved, dict):  # plain data; older checkpoints hold numpy's own tuple
        saved = {
            "bit_generator": saved["bit_generator"],
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
        }
    np.random.set_state(saved)
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and device is not None and device.type == "cuda":
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every device's state
            cuda = cuda[device.index or 0] if (device.index or 0) < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def own_rng_states(saved: dict | list, rank: int) -> dict:
    """This rank's RNG states from a mid-epoch checkpoint: one entry per rank (older
    checkpoints hold rank 0's only, which every rank then takes)."""
    return saved[rank] if isinstance(saved, list) else saved


# -------------------------------------------------------------------------- signals
class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes its step, writes a checkpoint and exits."""

    signum: int | None = None


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def install_stop_handlers(stop: StopFlag) -> dict:
    """SIGINT/SIGTERM set `stop` (a second SIGINT interrupts at once); returns the old handlers."""

    def handler(signum, frame):
        if stop.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return previous


def restore_handlers(previous: dict, ignore_term: bool = False) -> None:
    """Put the old handlers back. `ignore_term` (a torchrun rank about to exit): SIGTERM is
    ignored instead, because torchrun SIGTERMs the ranks still closing once one has exited, and
    Python's exit restores the default action (death by signal) unless the signal is ignored."""
    for sig, h in previous.items():
        signal.signal(sig, signal.SIG_IGN if ignore_term and sig == signal.SIGTERM else h)
