"""Shared test setup: the repository root on sys.path, wandb off, small runs and temporary files in tmp dirs."""

import os
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocess runs: tiny models, no thread oversubscription
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need CUDA: skipped (with the reason) without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has configured its factory
def pytest_configure(config):
    """The system temp dir of this process and of its subprocesses (the test modules' ENV dicts copy os.environ
    at collection) is a folder under pytest's basetemp: wandb's tmp*wandb-media / tmp*wandb-artifacts, torchrun's
    and the runs' temporary files stay there, also when a test kills a run."""
    tmp = config._tmp_path_factory.getbasetemp() / "tmp"
    tmp.mkdir(exist_ok=True)
    config._saved_temp = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(tmp), str(tmp)


def pytest_unconfigure(config):
    if not hasattr(config, "_saved_temp"):
        return
    env, tempfile.tempdir = config._saved_temp
    if env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = env


@pytest.fixture(scope="session")
def temp_dir_under_basetemp(tmp_path_factory):
    """The folder that tempfile and subprocesses use during the tests."""
    return tmp_path_factory.getbasetemp() / "tmp"


@pytest.fixture(scope="session")
def refill_run(tmp_path_factory) -> str:
    """A finished res20s Refill run (2 states of 1 epoch, rate 0.5: channels dropped, on 96 synthetic images),
    trained once for every test that only reads it (a test that changes files works on a copy)."""
    from main_imp_fillback import main

    d = str(tmp_path_factory.mktemp("refill_run"))
    argv = ["--dataset", "synthetic", "--synthetic_size", "96", "--batch_size", "32", "--device", "cpu"]
    argv += ["--arch", "res20s", "--struct", "refill", "--rate", "0.5", "--pruning_times", "2", "--epochs", "1"]
    assert main(argv + ["--save_dir", d, "--wandb", "disabled"]) == 0
    return d


@pytest.fixture
def shallow_vits(monkeypatch) -> int:
    """In-process runs of this test build their ViTs with 2 blocks (same width, heads and MLP); returns the depth."""
    import imp_loop
    from models import create_model, is_vit

    def build(name, num_classes, img_size=None, **kw):
        return create_model(name, num_classes, img_size, **({"depth": 2} if is_vit(name) else {}), **kw)

    monkeypatch.setattr(imp_loop, "create_model", build)
    return 2


@pytest.fixture
def run_main(tmp_path, capsys):
    """Run main_imp_fillback.main in-process with small defaults; returns (rc, save_dir, stderr)."""
    from main_imp_fillback import main

    def _run(*flags, save_dir=None, small=True):
        save_dir = str(save_dir or tmp_path / "run")
        argv = ["--dataset", "synthetic", "--synthetic_size", "96", "--batch_size", "32"] if small else []
        argv += ["--device", "cpu"] + list(flags) + ["--save_dir", save_dir, "--wandb", "disabled"]  # later flags win
        rc = main(argv)
        return rc, save_dir, capsys.readouterr().err

    return _run
