"""A stop under torchrun (2 ranks, gloo on the CPU): a signal that reaches one rank only stops every
rank at the same step with exit code 128 + that signal and no traceback; the checkpoint keeps each
rank's RNG streams; the printed resume command repeats the launcher and, run as printed, continues
the run bit-identically to an uninterrupted one (ViT with drop path and mixup, and a CNN)."""

import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ENV, ROOT, small_run

# 192 images at a global batch of 8: 24 steps per epoch, so the ranks' stop check (every 20 global
# steps, imp_loop.STOP_CHECK_EVERY) falls at global step 40, step 16 of state 1's only epoch: mid-epoch
SMALL = small_run(192, 8) + ["--pruning_times", "2", "--epochs", "1"]
RUNS = {  # arch flags, the rank that gets the signal
    "vit_tiny": (
        ["--arch", "vit_tiny", "--struct", "rsst", "--vit_structured", "--vit_prune_target", "both", "--rate", "0.3"],
        1,
    ),  # the ViT recipe: drop path 0.1, mixup 0.8, cutmix 1.0
    "res20s": (["--arch", "res20s", "--struct", "rsst"], 0),
}


def torchrun(flags, save_dir, log_dir=None, wait=True):
    """torchrun with 2 processes; with `log_dir` each rank's stdout/stderr go to their own files."""
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *logs,
        os.path.join(ROOT, "main_imp_fillback.py"),
        *flags,
        *SMALL,
        "--save_dir",
        str(save_dir),
    ]
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    return p.communicate(timeout=900) + (p.returncode,) if wait else p


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    kids = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    for pid in kids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(pid)
    return out


def rank_log(log_dir, rank: int, stream: str) -> str:
    (path,) = glob.glob(os.path.join(str(log_dir), "**", "attempt_0", str(rank), f"{stream}.log"), recursive=True)
    with open(path) as f:
        return f.read()


def exit_codes(torchrun_stderr: str) -> dict[int, int]:
    """Each rank's exit code, from torchrun's failure report."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", torchrun_stderr)
    return {int(r): int(c) for r, c in found}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # mid-epoch checkpoints are plain data too


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(RUNS))
def test_signal_to_one_rank_stops_all_and_printed_torchrun_resume_is_identical(tmp_path, arch):
    flags, signalled = RUNS[arch]
    full, cut, logs = tmp_path / "full", tmp_path / "cut", tmp_path / "logs"
    _, err, rc = torchrun(flags, full)
    assert rc == 0, err[-3000:]

    p = torchrun(flags, cut, log_dir=logs, wait=False)
    deadline = time.time() + 600
    while not os.path.exists(cut / "0checkpoint.pth.tar") and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be signalled"
    os.kill(rank_pids(p.pid)[signalled], signal.SIGTERM)  # one rank only, not torchrun
    _, launcher_err = p.communicate(timeout=600)

    assert exit_codes(launcher_err) == {0: 128 + signal.SIGTERM, 1: 128 + signal.SIGTERM}, launcher_err[-3000:]
    errs = [rank_log(logs, r, "stderr") for r in (0, 1)]
    assert not any("Traceback" in e for e in errs), errs
    said = [line for line in errs[0].splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("stopped by signal 15; checkpoint written"), errs[0]
    assert "stopped by signal" not in errs[1]

    ck = load(cut / "latest.pth.tar")  # stopped mid-epoch in state 1, with both ranks' RNG streams
    assert ck["phase"] == "train" and ck["state"] == 1 and 0 < ck["partial"]["steps"] < 24, ck["partial"]
    rng = ck["partial"]["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert rng[0]["numpy"]["key"].tolist() != rng[1]["numpy"]["key"].tolist()

    cmd = shlex.split(said[0].split("Continue with: ", 1)[1])
    assert os.path.basename(cmd[0]) == "torchrun" and "--nproc_per_node=2" in cmd and str(cut) in cmd
    resumed = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for state in range(2):
        a, b = (load(d / f"{state}checkpoint.pth.tar") for d in (full, cut))
        for kind in ("hard", "imp", "target", "penalty"):
            assert all(torch.equal(a["masks"][kind][n], b["masks"][kind][n]) for n in a["masks"][kind])
        assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in a["state_dict"]), state
        assert a["rows"][-1]["final_test_acc"] == b["rows"][-1]["final_test_acc"]


def test_resume_command_repeats_the_launcher_with_the_process_count(monkeypatch):
    import argparse

    from main_imp_fillback import resume_command

    args = argparse.Namespace(save_dir="/runs/r", threads=1, wandb="disabled", device="cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert shlex.split(resume_command(args))[:3] == [
        sys.executable,
        os.path.join(ROOT, "main_imp_fillback.py"),
        "--resume",
    ]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cmd = shlex.split(resume_command(args))
    assert os.path.basename(cmd[0]) == "torchrun" and cmd[1:3] == ["--standalone", "--nproc_per_node=2"]
    assert cmd[3:6] == [os.path.join(ROOT, "main_imp_fillback.py"), "--resume", "--save_dir"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cmd = shlex.split(resume_command(args), comments=True)
    assert cmd[1:3] == ["--nnodes=2", "--nproc_per_node=4"] and "# on every node" in resume_command(args)
