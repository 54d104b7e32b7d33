"""Never lose a run: SIGTERM mid-state then --resume equals an uninterrupted run; unreadable
checkpoints are skipped. (SIGKILL at five moments for a CNN and two for a ViT: tests/test_reliability.py;
torchrun: tests/test_distributed.py.)"""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ENV, ROOT, small_run

SMALL = small_run(96, 32)
RUN = ["--arch", "res20s", "--struct", "rsst", "--pruning_times", "3", "--epochs", "2"]


def cli(*flags, save_dir):
    return [sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *flags, *SMALL, "--save_dir", str(save_dir)]


def run(*flags, save_dir):
    p = subprocess.run(cli(*flags, save_dir=save_dir), cwd=ROOT, env=ENV, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def start_and_signal(flags, save_dir, sig, marker="1model_SA_best.pth.tar"):
    """Start a run, send `sig` as soon as `marker` appears (mid state 1), wait for the exit."""
    p = subprocess.Popen(
        cli(*flags, save_dir=save_dir), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(save_dir, marker)) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "run ended before it could be interrupted"
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def final_state(save_dir, states=3):
    cks = [
        torch.load(os.path.join(save_dir, f"{k}checkpoint.pth.tar"), map_location="cpu", weights_only=True)
        for k in range(states)
    ]
    with open(os.path.join(save_dir, "summary.csv")) as f:
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    return cks, rows


def assert_same_run(a_dir, b_dir):
    (ca, ra), (cb, rb) = final_state(a_dir), final_state(b_dir)
    assert ra == rb
    for a, b in zip(ca, cb):
        for kind in ("hard", "imp", "target", "penalty"):
            assert all(torch.equal(a["masks"][kind][n], b["masks"][kind][n]) for n in a["masks"][kind])
        assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in a["state_dict"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run, in-process (one interpreter start less); the runs it is compared with are processes."""
    from main_imp_fillback import main

    d = tmp_path_factory.mktemp("full_res20s")
    assert main([*RUN, *SMALL, "--save_dir", str(d)]) == 0
    return d


@pytest.mark.slow
def test_sigterm_finishes_step_writes_checkpoint_and_resumes_exactly(uninterrupted, tmp_path):
    rc, _, err = start_and_signal(RUN, tmp_path, signal.SIGTERM)
    assert rc == 143 and "--resume" in err and "Traceback" not in err
    assert os.path.isfile(os.path.join(tmp_path, "latest.pth.tar"))
    rc, _, err = run("--resume", save_dir=tmp_path)
    assert rc == 0, err
    assert_same_run(uninterrupted, tmp_path)


@pytest.mark.slow
def test_garbage_latest_falls_back_to_state_checkpoint(uninterrupted, tmp_path):
    rc, _, _ = start_and_signal(RUN, tmp_path, signal.SIGKILL, marker="2model_SA_best.pth.tar")
    with open(os.path.join(tmp_path, "latest.pth.tar"), "wb") as f:
        f.write(b"\x00garbage")
    rc, _, err = run("--resume", save_dir=tmp_path)
    assert rc == 0 and "skipping unreadable checkpoint" in err
    assert_same_run(uninterrupted, tmp_path)


@pytest.mark.slow  # a run process: interpreter and torch start
def test_no_readable_checkpoint_exits_2(tmp_path):
    for name in ("latest.pth.tar", "0checkpoint.pth.tar"):
        with open(os.path.join(tmp_path, name), "wb") as f:
            f.write(b"truncated")
    rc, _, err = run("--resume", save_dir=tmp_path)
    assert rc == 2 and "nothing to resume" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]
