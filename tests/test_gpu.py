"""CUDA-only checks (`pytest -m gpu`; skipped without CUDA): a real GPU run of RSST for a CNN and a
ViT, resume after a kill, export on the GPU, and the precision choice. GPU kernels are not
bit-deterministic by default, so these compare with tolerances; with --deterministic a resume
is bit-exact."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import trainer

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled"}
FLAGS = [
    "--dataset",
    "synthetic",
    "--synthetic_size",
    "512",
    "--batch_size",
    "64",
    "--wandb",
    "disabled",
    "--device",
    "cuda",
    "--pruning_times",
    "2",
    "--epochs",
    "2",
]
RUNS = {
    "res20s": ["--arch", "res20s", "--struct", "rsst"],
    "vit_tiny": ["--arch", "vit_tiny", "--struct", "rsst", "--vit_structured", "--vit_prune_target", "both"],
}


def cli(*flags, save_dir):
    return [sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *FLAGS, *flags, "--save_dir", str(save_dir)]


def rows(d):
    with open(os.path.join(d, "summary.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("arch", list(RUNS))
def test_cuda_rsst_run_removes_at_reg_end_and_exports(tmp_path, arch):
    p = subprocess.run(
        cli(*RUNS[arch], save_dir=tmp_path), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ck = torch.load(tmp_path / "1checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert ck["state_progress"]["removal"]["norm_ratio"] < 1e-2
    assert all(torch.equal(ck["mask"][n], ck["masks"]["target"][n]) for n in ck["mask"])
    out = tmp_path / "compact.pt"
    e = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "export.py"),
            "--checkpoint",
            str(tmp_path / "1checkpoint.pth.tar"),
            "--out",
            str(out),
            "--device",
            "cuda",
            "--repeats",
            "3",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert e.returncode == 0 and "cuda b64 ms" in e.stdout, e.stderr[-2000:]


def _kill_and_resume(tmp_path, extra):
    d = tmp_path / "cut"
    p = subprocess.Popen(cli(*RUNS["res20s"], *extra, save_dir=d), cwd=ROOT, env=ENV)
    deadline = time.time() + 600
    while not os.path.exists(d / "1model_SA_best.pth.tar") and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "main_imp_fillback.py"),
            "--resume",
            "--save_dir",
            str(d),
            "--device",
            "cuda",
            "--wandb",
            "disabled",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    full = tmp_path / "full"
    assert subprocess.run(cli(*RUNS["res20s"], *extra, save_dir=full), cwd=ROOT, env=ENV).returncode == 0
    return full, d


def test_cuda_kill_and_resume_stays_close(tmp_path):
    full, cut = _kill_and_resume(tmp_path, [])
    for a, b in zip(rows(full), rows(cut)):
        assert abs(float(a["remaining_weights"]) - float(b["remaining_weights"])) < 0.5
        assert abs(float(a["final_test_acc"]) - float(b["final_test_acc"])) < 15  # nondeterministic kernels


def test_cuda_deterministic_resume_is_bit_exact(tmp_path):
    full, cut = _kill_and_resume(tmp_path, ["--deterministic"])
    for s in range(2):
        a, b = (torch.load(d / f"{s}checkpoint.pth.tar", map_location="cpu", weights_only=True) for d in (full, cut))
        assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in a["state_dict"])


def test_amp_auto_is_bf16_where_supported_else_fp16_with_scaling():
    dev = torch.device("cuda")
    dtype = trainer.amp_dtype("auto", dev)
    assert dtype == (torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float16)
    assert trainer.grad_scaler(torch.float16).is_enabled() and not trainer.grad_scaler(torch.bfloat16).is_enabled()
    assert trainer.amp_dtype("off", dev) is None
