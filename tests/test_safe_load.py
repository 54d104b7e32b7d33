"""Run files are read safely: every checkpoint loads with weights_only=True (a file carrying pickled
code is refused with one line, exit 2, and nothing runs), RNG states are plain data, and a damaged
state checkpoint in a finished run is skipped with one warning by every report path."""

import csv
import os
import random
import shutil

import numpy as np
import pytest
import torch

import checkpoints as C
import compare

RUN = ["--arch", "res20s", "--struct", "rsst", "--pruning_times", "2", "--epochs", "1", "--threads", "1"]


class Payload:
    """Pickles as a call of os.system: loading it with weights_only=False runs the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-state res20s run (in-process, once per module)."""
    from main_imp_fillback import main

    d = tmp_path_factory.mktemp("finished")
    argv = [
        "--dataset",
        "synthetic",
        "--synthetic_size",
        "64",
        "--batch_size",
        "32",
        "--device",
        "cpu",
        "--wandb",
        "disabled",
        *RUN,
        "--save_dir",
        str(d),
    ]
    assert main(argv) == 0
    return d


def summary(save_dir):
    with open(os.path.join(save_dir, "summary.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def resume(run_main, d, *flags):
    return run_main("--resume", "--device", "cpu", "--threads", "1", *flags, save_dir=d, small=False)


def test_rng_states_are_plain_data_and_restore_every_stream(tmp_path):
    np.random.seed(3), np.random.randn(3), random.seed(5), random.gauss(0, 1), torch.manual_seed(7)
    torch.save({"rng": C.rng_states()}, tmp_path / "rng.pt")
    ahead = (np.random.rand(4).tolist(), random.random(), torch.rand(3))
    C.set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])  # no allowlist needed
    again = (np.random.rand(4).tolist(), random.random(), torch.rand(3))
    assert ahead[:2] == again[:2] and torch.equal(ahead[2], again[2])
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"partial": {"rng": old}}, tmp_path / "old.pt")  # a mid-epoch checkpoint of an older version
    ahead = np.random.rand(4).tolist()
    C.set_rng_states(C.own_rng_states(C.load_safely(str(tmp_path / "old.pt"))["partial"]["rng"], 1))
    assert np.random.rand(4).tolist() == ahead


@pytest.mark.slow
def test_resume_refuses_a_latest_checkpoint_with_pickled_code(finished, run_main, tmp_path):
    d = shutil.copytree(finished, tmp_path / "run")
    marker = tmp_path / "code_ran"
    os.remove(d / "1checkpoint.pth.tar")  # accepted, the resume would train state 1
    ck = torch.load(d / "0checkpoint.pth.tar", weights_only=True)
    torch.save({**ck, "hook": Payload(f"touch {marker}")}, d / "latest.pth.tar")
    torch.load(d / "latest.pth.tar", weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    before = sorted(os.listdir(d))
    rc, _, err = resume(run_main, d)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "refused" in lines[0] and "pickled code" in lines[0], err
    assert "latest.pth.tar" in lines[0] and "Traceback" not in err
    assert not marker.exists() and sorted(os.listdir(d)) == before  # nothing ran, nothing written

    rc, _, err = run_main(
        "--resume",
        "--checkpoint",
        str(d / "latest.pth.tar"),
        "--device",
        "cpu",
        save_dir=tmp_path / "elsewhere",
        small=False,
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "pickled code" in err and not marker.exists()


@pytest.mark.slow
def test_compare_and_export_refuse_a_state_checkpoint_with_pickled_code(finished, tmp_path, capsys):
    import export

    d = shutil.copytree(finished, tmp_path / "run")
    marker = tmp_path / "code_ran"
    ck = torch.load(d / "0checkpoint.pth.tar", weights_only=True)
    torch.save({**ck, "hook": Payload(f"touch {marker}")}, d / "0checkpoint.pth.tar")
    assert compare.main([str(d), "--out", str(tmp_path / "cmp"), "--masks"]) == 2
    assert export.main(["--checkpoint", str(d / "0checkpoint.pth.tar"), "--out", str(tmp_path / "x.pt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("pickled code" in line for line in lines) and not marker.exists()


@pytest.mark.slow
def test_damaged_state_checkpoint_in_a_finished_run_is_skipped_by_every_report(finished, run_main, tmp_path, capsys):
    d = shutil.copytree(finished, tmp_path / "run")
    (d / "0checkpoint.pth.tar").write_bytes(b"\0" * 1000)
    (d / "best_checkpoint.pth.tar").write_bytes(b"")
    rc, _, err = resume(run_main, d)
    assert rc == 0 and "Traceback" not in err, err
    warned = [line for line in err.splitlines() if "0checkpoint.pth.tar" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: skipping unreadable checkpoint"), err
    assert summary(d) == summary(finished) and len(summary(d)) == 2

    assert compare.main([str(d), "--out", str(tmp_path / "cmp"), "--masks"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "warning" in line] == warned, err
    assert os.path.isfile(tmp_path / "cmp.md")
