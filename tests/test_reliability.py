"""Never lose a run, part 2: the save-dir lock, kills at the state end and at random moments, a
full disk, damaged run files, first-epoch kills, the exact resume command, and every bad value
from the command line or a --config file (one line, exit 2)."""

import csv
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import ENV, ROOT, small_run

import checkpoints
import imp_loop

SMALL = small_run(64, 32)
CNN = ["--arch", "res20s", "--struct", "rsst", "--pruning_times", "2", "--epochs", "2"]
VIT = [
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
    "2",
    "--epochs",
    "2",
    "--synthetic_size",
    "32",
    "--batch_size",
    "16",
]


CNN_RM = [*CNN, "--synthetic_size", "64"]  # run_main's defaults differ from SMALL's data size


class Killed(BaseException):
    """Stands for a SIGKILL at a chosen line: nothing after it runs, no handler sees it."""


def cli(*flags, save_dir):
    return [sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *SMALL, *flags, "--save_dir", str(save_dir)]


def summary(save_dir):
    with open(os.path.join(save_dir, "summary.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def assert_same_run(a, b, states=2):
    assert summary(a) == summary(b)
    for s in range(states):
        ca, cb = (torch.load(os.path.join(d, f"{s}checkpoint.pth.tar"), weights_only=True) for d in (a, b))
        for kind in ("hard", "imp", "target", "penalty"):
            assert all(torch.equal(ca["masks"][kind][n], cb["masks"][kind][n]) for n in ca["masks"][kind])
        assert all(torch.equal(ca["state_dict"][n], cb["state_dict"][n]) for n in ca["state_dict"])
        assert os.path.isfile(os.path.join(b, f"{s}_curves.png"))
    assert not [f for f in os.listdir(b) if f.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted in-process runs, once per module: name -> save dir."""
    from main_imp_fillback import main

    out = {}
    for name, flags in (("cnn", CNN), ("cnn3", CNN[:-3] + ["3", "--epochs", "1"])):
        d = tmp_path_factory.mktemp(name)
        assert main([*SMALL, *flags, "--save_dir", str(d)]) == 0
        out[name] = str(d)
    return out


# ----------------------------------------------------------------------------- lock
@pytest.mark.slow
def test_two_runs_on_one_save_dir_one_exits_2_the_other_is_intact(tmp_path):
    d = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            cli(*CNN, "--seed", str(seed), save_dir=d),
            cwd=ROOT,
            env=ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed in (1, 2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    winner = 1 + [rc for rc, _ in results].index(0)
    loser_err = results[[rc for rc, _ in results].index(2)][1]
    assert len(loser_err.strip().splitlines()) == 1 and "Traceback" not in loser_err
    assert "in use by another run" in loser_err or "holds another run" in loser_err
    with open(d / "args.yaml") as f:
        assert yaml.safe_load(f)["seed"] == winner
    assert torch.load(d / "1checkpoint.pth.tar", weights_only=True)["config"]["seed"] == winner


def test_lock_names_the_holder_and_is_released(tmp_path):
    held = checkpoints.RunDir(str(tmp_path / "d"))
    with pytest.raises(checkpoints.UsageError, match=f"in use by another run \\(pid {os.getpid()}"):
        checkpoints.RunDir(str(tmp_path / "d"))
    held.release()
    checkpoints.RunDir(str(tmp_path / "d")).release()


def test_leftover_tmp_files_are_removed_on_start(tmp_path):
    os.makedirs(tmp_path / "d")
    (tmp_path / "d" / "latest.pth.tar.999.tmp").write_bytes(b"half a file")
    checkpoints.RunDir(str(tmp_path / "d")).release()
    assert os.listdir(tmp_path / "d") == [".lock"]


# ------------------------------------------------------------------- state end kills
def _kill_at(monkeypatch, method: str, state: int):
    real = getattr(imp_loop.IMPRun, method)

    def dying(self, s, *a, **kw):
        if s == state:
            raise Killed
        return real(self, s, *a, **kw)

    monkeypatch.setattr(imp_loop.IMPRun, method, dying)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["finish_state", "_write_reports"], ids=["between-last-epoch-and-pointer", "after-last-pointer"]
)
def test_kill_at_the_last_state_end_then_resume_gives_the_full_summary(
    run_main, reference, monkeypatch, tmp_path, method
):
    _kill_at(monkeypatch, method, 1)
    with pytest.raises(Killed):
        run_main(*CNN_RM, save_dir=tmp_path / "r")
    monkeypatch.undo()
    rc, d, err = run_main("--resume", "--device", "cpu", save_dir=tmp_path / "r", small=False)
    assert rc == 0, err
    assert_same_run(reference["cnn"], d)
    assert float(summary(d)[1]["final_lambda"]) > 0  # the RSST strength, restored from the checkpoint


@pytest.mark.slow
def test_kill_after_a_middle_state_pointer_rebuilds_its_plots(run_main, reference, monkeypatch, tmp_path):
    _kill_at(monkeypatch, "_write_reports", 1)
    with pytest.raises(Killed):
        run_main(*CNN[:-3], "3", "--epochs", "1", "--synthetic_size", "64", save_dir=tmp_path / "r")
    monkeypatch.undo()
    assert not os.path.isfile(tmp_path / "r" / "1_curves.png")
    rc, d, err = run_main("--resume", "--device", "cpu", save_dir=tmp_path / "r", small=False)
    assert rc == 0, err
    assert_same_run(reference["cnn3"], d, states=3)
    assert os.path.isfile(os.path.join(d, "1_lambda.png"))


@pytest.mark.slow
def test_resume_of_a_finished_run_says_so(reference, tmp_path, capsys):
    import shutil

    from main_imp_fillback import main

    d = shutil.copytree(reference["cnn"], tmp_path / "copy")
    os.remove(d / "summary.csv")
    assert main(["--resume", "--save_dir", str(d), "--device", "cpu"]) == 0
    assert "finished all 2 states" in capsys.readouterr().out
    assert summary(d) == summary(reference["cnn"])


# ------------------------------------------------------------------------- full disk
@pytest.mark.slow
@pytest.mark.parametrize(
    "error",
    [RuntimeError("[enforce fail at inline_container.cc] unexpected pos 4160"), OSError(28, "No space left on device")],
    ids=["torch-runtime", "oserror"],
)
def test_full_disk_exits_1_leaves_no_partial_file_and_resumes_exactly(
    run_main, reference, monkeypatch, tmp_path, error
):
    real, calls = torch.save, {"latest": 0}

    def full_disk(obj, f, *a, **kw):
        if "latest" in getattr(f, "name", ""):
            calls["latest"] += 1
            if calls["latest"] == 4:  # state 1, first epoch
                f.write(b"partial")
                raise error
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    rc, d, err = run_main(*CNN_RM, save_dir=tmp_path / "r")
    monkeypatch.undo()
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "last good checkpoint" in lines[0].lower() and "Traceback" not in err
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    rc, d, err = run_main("--resume", "--device", "cpu", save_dir=d, small=False)
    assert rc == 0, err
    assert_same_run(reference["cnn"], d)


@pytest.mark.slow
def test_args_yaml_on_a_full_disk_exits_1_and_leaves_no_stuck_dir(run_main, monkeypatch, tmp_path):
    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(yaml, "safe_dump", full)
    rc, d, err = run_main(*CNN, save_dir=tmp_path / "new")
    assert rc == 1 and "args.yaml" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(d)  # nothing of the failed start is left
    monkeypatch.undo()
    rc, _, _ = run_main(*CNN[:-3], "1", "--epochs", "1", save_dir=tmp_path / "new")
    assert rc == 0


# ---------------------------------------------------------------------- damaged files
@pytest.mark.slow
def test_zeroed_state_checkpoint_with_good_latest_resumes(run_main, reference, monkeypatch, tmp_path):
    _kill_at(monkeypatch, "finish_state", 1)
    with pytest.raises(Killed):
        run_main(*CNN_RM, save_dir=tmp_path / "r")
    monkeypatch.undo()
    size = os.path.getsize(tmp_path / "r" / "0checkpoint.pth.tar")
    (tmp_path / "r" / "0checkpoint.pth.tar").write_bytes(b"\0" * size)
    (tmp_path / "r" / "best_checkpoint.pth.tar").write_bytes(b"a stray file")
    rc, d, err = run_main("--resume", "--device", "cpu", save_dir=tmp_path / "r", small=False)
    assert rc == 0 and "Traceback" not in err, err
    assert len(summary(d)) == 2


def test_readers_skip_unreadable_files_with_a_warning(tmp_path, capsys):
    from mask_plots import load_state_masks

    (tmp_path / "0checkpoint.pth.tar").write_bytes(b"\0" * 64)
    (tmp_path / "best_checkpoint.pth.tar").write_bytes(b"x")
    assert load_state_masks(str(tmp_path)) == []
    assert "skipping unreadable checkpoint" in capsys.readouterr().err
    assert checkpoints.state_checkpoints(str(tmp_path)) == {0: str(tmp_path / "0checkpoint.pth.tar")}


@pytest.mark.slow
def test_kill_in_the_first_epoch_resume_starts_over(run_main, reference, monkeypatch, tmp_path):
    real = imp_loop.train_one_epoch
    monkeypatch.setattr(imp_loop, "train_one_epoch", lambda *a, **kw: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        run_main(*CNN_RM, save_dir=tmp_path / "r")
    monkeypatch.setattr(imp_loop, "train_one_epoch", real)
    assert os.path.isfile(tmp_path / "r" / "args.yaml") and not os.path.exists(tmp_path / "r" / "latest.pth.tar")
    rc, _, err = run_main(*CNN_RM, save_dir=tmp_path / "r")
    assert rc == 2 and "--resume" in err and "--overwrite" in err
    rc, d, err = run_main("--resume", "--device", "cpu", save_dir=tmp_path / "r", small=False)
    assert rc == 0 and "starting the run over" in err, err
    assert_same_run(reference["cnn"], d)


@pytest.mark.slow
def test_resume_from_a_checkpoint_into_another_folder(run_main, reference, tmp_path):
    import shutil

    ck = os.path.join(reference["cnn"], "0checkpoint.pth.tar")
    rc, d, err = run_main(
        "--resume", "--checkpoint", ck, "--device", "cpu", save_dir=tmp_path / "elsewhere", small=False
    )
    assert rc == 0, err  # the initial weights come from beside the checkpoint
    init = lambda p: torch.load(os.path.join(p, "init.pth.tar"), weights_only=True)["state_dict"]
    assert all(torch.equal(v, init(reference["cnn"])[k]) for k, v in init(d).items())
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(ck, lone / "0checkpoint.pth.tar")
    rc, _, err = run_main(
        "--resume", "--checkpoint", str(lone / "0checkpoint.pth.tar"), save_dir=tmp_path / "x", small=False
    )
    assert rc == 2 and "initial weights" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------- resume command
@pytest.mark.slow
def test_printed_resume_command_is_exact_and_runs(tmp_path):
    d = tmp_path / "a dir with spaces"
    p = subprocess.Popen(
        cli(*CNN, "--exp_name", "name with spaces", save_dir=d),
        cwd=ROOT,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while not os.path.exists(d / "0model_SA_best.pth.tar") and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143
    cmd = shlex.split(err.strip().splitlines()[-1].split("Continue with: ", 1)[1])
    assert cmd[0] == sys.executable and "--threads" in cmd and "--wandb" in cmd and str(d) in cmd
    rc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600).returncode
    assert rc == 0 and len(summary(d)) == 2


# ------------------------------------------------------------------ kills at random
# Five SIGKILLs in a row on one run, each at a later moment (after a file appears, plus a delay),
# each followed by --resume: startup, mid-epoch, right after a state's reports, after the RSST
# removal, between a state checkpoint and its reports. Then the run must equal an uninterrupted one.
KILLS = (
    ("args.yaml", 0.6),
    ("0model_SA_best.pth.tar", 0.2),
    ("0_curves.png", 0.0),
    ("1model_SA_best.pth.tar", 0.1),
    ("1checkpoint.pth.tar", 0.0),
)
# The ViT: the two mid-epoch moments, where its own randomness (drop path, mixup, TrivialAugment) is
# in flight; startup and the moments around a state's files are the loop's, the same for every arch.
VIT_KILLS = (KILLS[1], KILLS[3])


def _start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("flags, kills", [(CNN, KILLS), (VIT, VIT_KILLS)], ids=["res20s", "vit_tiny"])
def test_sigkill_at_many_moments_then_resume_is_identical(tmp_path, flags, kills):
    from main_imp_fillback import main

    full, d = tmp_path / "full", tmp_path / "cut"
    assert main([*SMALL, *flags, "--save_dir", str(full)]) == 0  # the reference in-process: one process start less
    resume = [
        sys.executable,
        os.path.join(ROOT, "main_imp_fillback.py"),
        "--resume",
        "--save_dir",
        str(d),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--wandb",
        "disabled",
    ]
    killed = 0
    for i, (marker, delay) in enumerate(kills):
        p = _start(cli(*flags, save_dir=d) if i == 0 else resume)
        deadline = time.time() + 300
        while not os.path.exists(d / marker) and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        killed += p.poll() is None
        p.kill()
        p.wait()
    assert killed >= len(kills) - 1  # the run was still going at (nearly) every moment
    r = subprocess.run(resume, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(full, d)


# ---------------------------------------------------------------- config and flags
BAD_CONFIGS = [
    ("struct: prune\n", "--struct"),
    ("criteria: random\n", "--criteria"),
    ("arch: foo\n", "--arch"),
    ("rate: [1, 2]\n", "rate"),
    ("epochs: 2.5\n", "--epochs"),
    ("42\n", "mapping"),
    ("seed: -1\n", "--seed"),
    ("warmup: .nan\n", "--warmup"),
    ("vit_structured: maybe\n", "vit_structured"),
]


@pytest.mark.parametrize("text, needle", BAD_CONFIGS, ids=[c for c, _ in BAD_CONFIGS])
def test_bad_config_values_exit_2_with_one_line(run_main, tmp_path, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    rc, d, err = run_main("--config", str(cfg))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err
    assert not os.path.exists(d)


BAD_FLAGS = [
    (["--seed", "99999999999999999999"], "--seed"),
    (["--warmup", "nan"], "--warmup"),
    (["--momentum", "-1"], "--momentum"),
    (["--label_smoothing", "2"], "--label_smoothing"),
    (["--synthetic_size", "100000000"], "--synthetic_size"),
    (["--weight_decay", "-1"], "--weight_decay"),
    (["--decreasing_lr", "-1"], "--decreasing_lr"),
    (["--lr", "inf"], "--lr"),
    (["--reg_end", "0"], "--reg_end"),
    (["--reg_target", "1"], "--reg_target"),
    (["--mixup", "-0.5"], "--mixup"),
    (["--vit_prune_target", "mlp"], "--vit_prune_target"),
    (["--arch", "vit_tiny", "--vit_prune_target", "mlp"], "--vit_structured"),
]


@pytest.mark.parametrize("flags, needle", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_numeric_flags_exit_2_with_one_line(run_main, flags, needle):
    rc, d, err = run_main(*flags)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err
    assert not os.path.exists(d)


@pytest.mark.slow
def test_resume_refuses_an_explicit_flag_that_differs_even_a_default(run_main, tmp_path):
    rc, d, _ = run_main(*CNN[:-3], "1", "--epochs", "1", "--rate", "0.3", save_dir=tmp_path / "r")
    assert rc == 0
    rc, _, err = run_main("--resume", "--rate", "0.2", save_dir=d, small=False)
    assert rc == 2 and "--rate 0.2" in err and "0.3" in err
    rc, _, err = run_main("--resume", "--rate", "0.3", save_dir=d, small=False)  # the same value is fine
    assert rc == 0, err


def test_failed_data_load_leaves_no_save_dir(run_main, tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd.CIFAR10, "download", lambda self: (_ for _ in ()).throw(OSError("offline")))
    rc, d, err = run_main("--dataset", "cifar10", "--data", str(tmp_path / "nodata"), small=False)
    assert rc == 2 and "--dataset digits" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(d) and not os.path.exists(tmp_path / "nodata")


# -------------------------------------------------------------- export and compare
@pytest.mark.slow
def test_export_and_compare_check_out_before_the_work(reference, tmp_path, capsys):
    import compare
    import export

    ck = os.path.join(reference["cnn"], "1checkpoint.pth.tar")
    for out in (str(tmp_path), str(tmp_path) + os.sep):
        assert export.main(["--checkpoint", ck, "--out", out]) == 2
        assert compare.main([reference["cnn"], "--out", out]) == 2
    assert export.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "is a directory" in err and "Traceback" not in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert export.main(["--checkpoint", ck, "--out", str(ro / "x.pt")]) == 2
        assert compare.main([reference["cnn"], "--out", str(ro / "cmp")]) == 2


@pytest.mark.slow
def test_compare_tolerates_null_fields_and_refuses_a_string_state(reference, tmp_path, capsys):
    import json
    import shutil

    import compare

    run = shutil.copytree(reference["cnn"], tmp_path / "run")
    with open(run / "summary.json") as f:
        rows = json.load(f)
    rows[1]["final_test_acc"] = None
    (run / "summary.json").write_text(json.dumps(rows))
    assert compare.main([str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert "–" in (tmp_path / "cmp.md").read_text()
    rows[1]["state"] = "one"
    (run / "summary.json").write_text(json.dumps(rows))
    assert compare.main([str(run), "--out", str(tmp_path / "cmp")]) == 2
    assert "not an integer" in capsys.readouterr().err
