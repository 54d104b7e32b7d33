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
from helpers import ENV, ROOT, small_run

import checkpoints as C
import distributed as D
import loaders as L
from dataset import augment_for, load_splits

SMALL = small_run(64, 32)
RUNS = {
    "res20s": ["--arch", "res20s", "--struct", "rsst", "--pruning_times", "3", "--epochs", "1"],
    "mamba_tiny": ["--arch", "mamba_tiny", "--depth", "1", "--struct", "rsst", "--pruning_times", "3", "--epochs", "1"],
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


def torchrun(*flags, save_dir, wait=True, cwd=ROOT):
    """torchrun with 2 processes on the CPU; `save_dir` None: the run's automatic folder in `cwd`."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "main_imp_fillback.py"),
        *flags,
        *SMALL,
        *(["--save_dir", str(save_dir)] if save_dir else []),
    ]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)


def digests(stdout: str, state: int) -> dict:
    # the ranks share stdout, so a line may run into the next one: match the number only
    return dict(re.findall(rf"rank (\d) state {state} mask digest (-?\d+\.\d)", stdout))


def one_process_test_eval(ck: dict) -> dict:
    """The test loss and accuracy of a saved model, evaluated in this one process."""
    from models import create_model
    from trainer import evaluate

    data = load_splits("synthetic", "unused", False, 64)
    model = create_model(ck["arch"], data.num_classes, data.img_size)
    model.load_state_dict(ck["state_dict"])
    cpu = torch.device("cpu")
    _, _, test = L.build_loaders(data, "synthetic", False, cpu, L.EpochSampler(len(data.train)), 32, 64, 0)
    return evaluate(model, test, cpu)


@pytest.fixture(scope="module")
def torchrun_of(tmp_path_factory):
    """arch -> (run folder, finished process) of an uninterrupted 2-rank run of RUNS[arch] under its automatic
    run name, started once per module in an empty folder (the run folder is checked to be the only one)."""
    done = {}

    def get(arch):
        if arch not in done:
            cwd = tmp_path_factory.mktemp(f"torchrun_{arch}")
            p = torchrun(*RUNS[arch], save_dir=None, cwd=cwd)
            runs = os.listdir(cwd)
            assert len(runs) == 1 and runs[0].startswith("synthetic_rsst_output_rsst_" + arch), (runs, p.stderr[-3000:])
            done[arch] = (cwd / runs[0], p)
        return done[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(RUNS))
def test_torchrun_two_ranks_three_states_same_masks(torchrun_of, arch):
    """Also: the reported test accuracy is that of the saved (rank 0) model, BatchNorm statistics
    included; the automatic run folder is rank 0's (one folder, in the launch directory)."""
    d, p = torchrun_of(arch)
    assert p.returncode == 0, p.stderr[-3000:]
    for state in range(3):
        digest = digests(p.stdout, state)
        assert set(digest) == {"0", "1"} and digest["0"] == digest["1"], (state, digest)
    assert len(re.findall(r"== state 2 done", p.stdout)) == 1  # only rank 0 reports
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    ck = torch.load(os.path.join(d, "2checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    assert ck["world"] == 2 and any(bool(m.any()) for m in ck["masks"]["penalty"].values())
    if arch == "res20s":  # each rank's own BN statistics would give another loss
        reported, alone = ck["state_progress"]["history"][-1], one_process_test_eval(ck)
        assert alone["acc"] == reported["test_acc"] == ck["rows"][-1]["final_test_acc"]
        assert abs(alone["loss"] - reported["test_loss"]) < 1e-5 * max(1.0, alone["loss"]), (alone, reported)


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
def test_gpu_check_script_dry_run_passes(tmp_path):
    out = tmp_path / "gpu_check"
    p = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env={**ENV, "PYTHON": sys.executable, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    block = p.stdout[p.stdout.index("===== gpu_check") :]
    assert "pytest -m gpu: exit 0" in block and "images/s" in block and "compact" in block
    for step in ("vit", "res20s", "compiled"):
        assert f"{step:9s} exit 0" in block, block
    assert "export: exit 0" in block and str(out) in block
    assert {"pytest.log", "vit.log", "res20s.log", "export.log", "compile.log"} <= set(os.listdir(out))
    assert all(re.search(rf"== step {k}: .*\(~[\d.]+ (min|s)\)", p.stderr) for k in range(1, 6)), p.stderr


def test_batch_42_on_two_ranks_with_mixup_exits_2_one_line_from_rank_0(tmp_path):
    """21 images per rank: mixup would be skipped on every step; refused before anything runs."""
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["--log-dir", str(logs), "--redirects", "3", os.path.join(ROOT, "main_imp_fillback.py")]
    cmd += [*RUNS["vit_tiny"], *SMALL, "--batch_size", "42", "--save_dir", str(tmp_path / "run")]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    errs = {}
    for rank in (0, 1):
        (path,) = [os.path.join(r, "stderr.log") for r, _, fs in os.walk(logs) if r.endswith(f"/{rank}")]
        errs[rank] = open(path).read()
    lines = [line for line in errs[0].splitlines() if line.strip()]
    assert len(lines) == 1 and "21 images per process is odd" in lines[0] and "multiple of 4" in lines[0], errs
    assert errs[1].strip() == "" and not os.path.exists(tmp_path / "run")
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", p.stderr))
    assert codes == {"0": "2", "1": "2"}, p.stderr[-2000:]


@pytest.mark.parametrize(
    "world, batch, mixup, fix",
    [(1, 33, "0.8", "multiple of 2"), (2, 43, "0", "use 42 or 44"), (3, 128, "0", "use 126 or 129")],
)
def test_batch_rules_single_process_check(world, batch, mixup, fix):
    import main_imp_fillback as mif

    args = mif.parse_args(["--arch", "vit_tiny", "--batch_size", str(batch), "--mixup", mixup, "--cutmix", "0"])
    with pytest.raises(mif.UsageError, match=fix) as e:
        mif.check_batch(args, world)
    assert e.value.every_rank and "\n" not in str(e.value)
    args.batch_size = 4 * world
    mif.check_batch(args, world)  # even per-rank batch: fine


def test_odd_batch_with_mixup_single_process_exits_2(run_main):
    rc, d, err = run_main("--arch", "vit_tiny", "--batch_size", "33")
    assert rc == 2 and err.count("\n") == 1 and "33 images per process is odd" in err and "--mixup 0.8" in err
    assert not os.path.exists(d)


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_amp_auto_is_bf16_only_where_native(monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5) emulate bf16 (is_bf16_supported says True): auto picks fp16 + scaling there."""
    import trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dev = torch.device("cuda", 0)
    assert trainer.native_bf16(dev) == (expected == torch.bfloat16)
    assert trainer.amp_dtype("auto", dev) == expected
    assert trainer.amp_dtype("bf16", dev) == torch.bfloat16 and trainer.amp_dtype("off", dev) is None
    assert not trainer.native_bf16(torch.device("cpu")) and trainer.amp_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not trainer.native_bf16(dev)


@pytest.mark.parametrize("cpus, local_world, expected", [(64, 1, 8), (16, 2, 7), (16, 8, 1), (2, 1, 1), (1, 4, 1)])
def test_folder_workers_default_follows_the_cpus_per_process(monkeypatch, cpus, local_world, expected):
    import main_imp_fillback as mif

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert mif.default_workers() == expected
    args = mif.parse_args(["--dataset", "folder", "--exp_name", "x"])
    mif.resolve(args)
    assert args.workers == expected
    args = mif.parse_args(["--dataset", "synthetic", "--exp_name", "x"])
    mif.resolve(args)
    assert args.workers == 0


def test_only_the_training_loader_keeps_its_workers():
    data = load_splits("digits", "unused", strong=False)
    train, val, test = L.build_loaders(
        data, "digits", False, torch.device("cpu"), L.EpochSampler(len(data.train)), 16, 32, 2, batched=False
    )
    assert train.persistent_workers and not val.persistent_workers and not test.persistent_workers


def test_single_process_cuda_n_sets_the_current_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(dev))
    assert D.select_device("cuda:1", D.Dist()) == torch.device("cuda", 1) and calls == [torch.device("cuda", 1)]
    D.select_device("cpu", D.Dist())
    D.select_device("cuda", D.Dist())  # no index: the current device stays
    assert len(calls) == 1


def test_run_name_and_folder_are_rank_0s(monkeypatch):
    monkeypatch.setattr(D, "init_distributed", lambda device: D.Dist(1, 2, 1))
    monkeypatch.setattr(D.dist, "broadcast_object_list", lambda box, src: box.__setitem__(0, ("rank0", "dir0")))
    assert D.from_main(("rank1", "dir1"), "cpu") == ("rank0", "dir0")
    monkeypatch.setattr(D, "init_distributed", lambda device: D.Dist())
    assert D.from_main(("mine", "dir"), "cpu") == ("mine", "dir")


def test_sync_bn_on_the_cpu_exits_2_with_one_line(run_main):
    rc, d, err = run_main("--arch", "res20s", "--sync_bn")
    assert rc == 2 and err.count("\n") == 1 and "--sync_bn: SyncBatchNorm needs CUDA" in err, err
    assert not os.path.exists(d)


def test_gpu_science_script_dry_run_checks_its_plan(tmp_path):
    results = open(os.path.join(ROOT, "bench", "RESULTS.md")).read()
    p = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_science.sh"), "--dry-run"],
        cwd=ROOT,
        env={**ENV, "PYTHON": sys.executable, "OUT": str(tmp_path / "science")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "--seeds 1 2 3 4 5" in p.stderr and "--deadline 290" in p.stderr
    assert p.stdout.count("| method | seeds | state 0 | state 1 | state 2 |") == 2  # vit and vit_ablation
    assert "RSST calibrated: `--struct rsst`" in p.stdout and "reg_end 0.3: `--struct rsst --reg_end 0.3`" in p.stdout
    assert open(os.path.join(ROOT, "bench", "RESULTS.md")).read() == results  # a dry run records nothing
