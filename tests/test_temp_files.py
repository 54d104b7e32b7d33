"""Tests write temporary files only under pytest's basetemp (wandb's temp folders included)."""

import os
import subprocess
import sys
import tempfile


def test_temp_dir_is_under_basetemp_here_and_in_subprocesses(tmp_path_factory, temp_dir_under_basetemp):
    base = str(tmp_path_factory.getbasetemp())
    assert tempfile.gettempdir() == str(temp_dir_under_basetemp) and tempfile.gettempdir().startswith(base)
    with tempfile.TemporaryDirectory("wandb-media") as d:  # what wandb makes when it is imported
        assert d.startswith(base)
    # a killed subprocess cannot clean up: what it leaves is under basetemp, not in the system temp dir
    code = "import os, tempfile; print(tempfile.mkdtemp('wandb-artifacts')); os._exit(0)"
    left = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert left.startswith(str(temp_dir_under_basetemp)) and os.path.isdir(left)


def test_test_modules_subprocess_env_has_the_temp_dir(temp_dir_under_basetemp):
    import test_resume  # its ENV, like the other modules', is copied from os.environ at import

    assert test_resume.ENV["TMPDIR"] == str(temp_dir_under_basetemp)
