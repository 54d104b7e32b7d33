"""The GPU and multi-process code paths, run on the CPU: torchrun with gloo (2 ranks), the forced
GPU paths (batched data, bf16 autocast, channels_last, torch.compile), per-rank randomness,
per-rank CUDA RNG state, rank-0-first downloads, and refused world-size changes."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints as C
import distributed as D
import loaders as L
from dataset import augment_for, load_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
SMALL = [
    "--dataset",
    "synthetic",
    "--synthetic_size",
    "64",
    "--batch_size",
    "32",
    "--wandb",
    "disabled",
    "--device",
    "cpu",
    "--threads",
    "1",
]
RUNS = {
    "res20s": ["--arch", "res20s", "--struct", "rsst", "--pruning_times", "3", "--epochs", "1"],
    "vit_tiny": [
        "--arch",
        "vit_tiny",
        "--struct",
        "rsst",
        "--vit_structured",
        "--vit_prune_target",
        "both",
        "--rate",
        "0.3",
        "--pruning_times",
        "3",
        "--epochs",
        "1",
    ],
}


def torchrun(*flags, save_dir, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "main_imp_fillback.py"),
        *flags,
        *SMALL,
        "--save_dir",
        str(save_dir),
    ]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def digests(stdout: str, state: int) -> dict:
    # the ranks share stdout, so a line may run into the next one: match the number only
    return dict(re.findall(rf"rank (\d) state {state} mask digest (-?\d+\.\d)", stdout))


@pytest.fixture(scope="module")
def torchrun_of(tmp_path_factory):
    """arch -> (save dir, finished process) of an uninterrupted 2-rank run of RUNS[arch], started once per module."""
    done = {}

    def get(arch):
        if arch not in done:
            d = tmp_path_factory.mktemp(f"torchrun_{arch}")
            done[arch] = (d, torchrun(*RUNS[arch], save_dir=d))
        return done[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(RUNS))
def test_torchrun_two_ranks_three_states_same_masks(torchrun_of, arch):
    d, p = torchrun_of(arch)
    assert p.returncode == 0, p.stderr[-3000:]
    for state in range(3):
        digest = digests(p.stdout, state)
        assert set(digest) == {"0", "1"} and digest["0"] == digest["1"], (state, digest)
    assert len(re.findall(r"== state 2 done", p.stdout)) == 1  # only rank 0 reports
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    ck = torch.load(os.path.join(d, "2checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    assert ck["world"] == 2 and any(bool(m.any()) for m in ck["masks"]["penalty"].values())


@pytest.mark.slow
def test_torchrun_killed_then_resumed_matches_uninterrupted(torchrun_of, tmp_path):
    full, p = torchrun_of("res20s")
    assert p.returncode == 0, p.stderr[-3000:]
    cut = tmp_path / "cut"
    p = torchrun(*RUNS["res20s"], save_dir=cut, wait=False)
    deadline = time.time() + 600
    while not os.path.exists(cut / "1model_SA_best.pth.tar") and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks at once, in state 1 of 3
    p.wait()
    resumed = torchrun("--resume", save_dir=cut)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for state in range(3):
        a = torch.load(os.path.join(full, f"{state}checkpoint.pth.tar"), weights_only=True)
        b = torch.load(os.path.join(cut, f"{state}checkpoint.pth.tar"), weights_only=True)
        assert all(torch.equal(a["mask"][n], b["mask"][n]) for n in a["mask"])
        assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in a["state_dict"])


@pytest.mark.slow
def test_resume_with_another_world_size_exits_2(run_main, refill_run, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(refill_run, d)
    ck_path = os.path.join(d, "0checkpoint.pth.tar")
    ck = torch.load(ck_path, weights_only=True)
    ck["world"] = 2
    torch.save(ck, os.path.join(d, "latest.pth.tar"))
    os.remove(os.path.join(d, "1checkpoint.pth.tar"))
    rc, _, err = run_main("--resume", save_dir=d, small=False)
    assert rc == 2 and "2 process" in err and "nproc_per_node=2" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(RUNS))
def test_forced_gpu_paths_run_on_cpu(run_main, monkeypatch, shallow_vits, arch):
    """RSST_FORCE_GPU_PATHS: bf16 autocast, channels_last CNNs and torch.compile (eager backend) on
    the CPU, the same branches a CUDA run takes."""
    monkeypatch.setenv("RSST_FORCE_GPU_PATHS", "1")
    monkeypatch.setenv("RSST_COMPILE_BACKEND", "eager")
    flags = RUNS[arch][:-4] + ["--pruning_times", "2", "--epochs", "1", "--compile"]
    rc, d, err = run_main(*flags, "--synthetic_size", "32", "--batch_size", "16")  # bf16 on a CPU is slow
    assert rc == 0, err
    ck = torch.load(os.path.join(d, "1checkpoint.pth.tar"), weights_only=True)
    assert ck["state_progress"]["removal"]["norm_ratio"] < 1e-2
    if arch == "res20s":
        w = ck["state_dict"]["layers.0.0.conv1.weight"]
        assert w.is_contiguous(memory_format=torch.channels_last)


def test_ranks_draw_different_augmentations_from_one_order():
    data = load_splits("digits", "unused", strong=True)
    aug = augment_for("digits", True, True)
    batches = []
    for rank in (0, 1):
        sampler = L.EpochSampler(len(data.train), 0, 1)  # the same indices on both, to isolate the randomness
        sampler.set_epoch(7)
        data.train.epoch_seed = 7
        loader = L.DeviceLoader(data.train, aug, 16, torch.device("cpu"), sampler, rank=rank)
        batches.append(next(iter(loader)))
    (x0, y0), (x1, y1) = batches
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)
    assert C.rank_seed(123, 0) == 123 and C.rank_seed(123, 1) != C.rank_seed(123, 2)


def test_cuda_rng_saved_and_restored_for_the_local_device_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.zeros(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, len(state))))
    dev = torch.device("cuda", 1)
    saved = C.rng_states(dev)
    assert calls == [("get", dev)] and saved["cuda"].numel() == 4
    C.set_rng_states(saved, dev)
    assert calls[-1] == ("set", dev, 4)
    old = dict(saved, cuda=[torch.zeros(2), torch.zeros(3)])  # an older checkpoint: every device of rank 0
    C.set_rng_states(old, dev)
    assert calls[-1] == ("set", dev, 3)
    C.set_rng_states(old, torch.device("cuda", 5))  # fewer GPUs in the checkpoint than this index: skipped
    assert calls[-1] == ("set", dev, 3)
    C.set_rng_states(saved, torch.device("cpu"))
    assert len(calls) == 3


def test_per_sample_transforms_leave_cuda_generators_alone(monkeypatch):
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(seed))
    data = load_splits("digits", "unused", strong=True)
    data.train.epoch_seed = 3
    a = data.train[5][0]
    assert seeded == [] and torch.equal(a, data.train[5][0])


def test_rank_zero_loads_data_first(monkeypatch):
    events = []
    monkeypatch.setattr(D.dist, "barrier", lambda: events.append("barrier"))
    for rank in (0, 1):
        events.clear()
        with D.rank_zero_first(D.Dist(rank, 2, rank)):
            events.append("load")
        assert events == (["load", "barrier"] if rank == 0 else ["barrier", "load"])
    events.clear()
    with D.rank_zero_first(D.Dist()):
        events.append("load")
    assert events == ["load"]


@pytest.mark.slow
def test_gpu_check_script_dry_run_passes():
    p = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env={**ENV, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    block = p.stdout[p.stdout.index("===== gpu_check") :]
    assert "pytest -m gpu: exit 0" in block and "images/s" in block and "compact" in block
