"""bench/bench_rsst.py: --methods that leave out the state-0 base method still run that base first."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_rsst  # noqa: E402


class Started(Exception):
    pass


def started_runs(monkeypatch, tmp_path, *argv):
    """The runs main() hands to run_all (nothing is trained), as (save dir relative to --out, states)."""
    seen = {}

    def fake_run_all(items, jobs, states_of, deadline=None):
        seen.update({os.path.relpath(it["save"], tmp_path): states_of[it["save"]] for it in items})
        assert all(it["base"] is None or it["base"] in states_of for it in items)  # every base is run too
        raise Started

    monkeypatch.setattr(bench_rsst, "run_all", fake_run_all)
    monkeypatch.setattr(sys, "argv", ["bench_rsst.py", *argv, "--out", str(tmp_path), "--no_record"])
    with pytest.raises(Started):
        bench_rsst.main()
    return seen


def test_methods_without_the_base_method_run_the_base(monkeypatch, tmp_path):
    argv = ["--groups", "res20s", "--methods", "Refill", "RSST calibrated", "--seeds", "4", "5"]
    runs = started_runs(monkeypatch, tmp_path, *argv)
    expected = {f"res20s/{m}_seed{s}" for m in ("imp_unstructured", "refill", "rsst_calibrated") for s in (4, 5)}
    assert set(runs) == expected and set(runs.values()) == {5}


def test_an_ablation_alone_runs_its_base_groups_base(monkeypatch, tmp_path):
    runs = started_runs(monkeypatch, tmp_path, "--groups", "vit_ablation", "--methods", "schedule x")
    assert runs == {"vit/refill_seed1": 3, "vit_ablation/schedule_x_seed1": 3}


def test_every_bench_script_imports_common_before_the_repository():
    """bench/common.py puts the repository on sys.path, so `python bench/X.py` from any folder works only when
    each script imports it before any repository module (an import sorter once moved it after them)."""
    import ast

    repo = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} | {"models"}
    scripts = sorted(f for f in os.listdir(os.path.join(ROOT, "bench")) if f.startswith("bench_") and f.endswith(".py"))
    late = {}
    for f in scripts:
        with open(os.path.join(ROOT, "bench", f)) as fh:
            tree = ast.parse(fh.read())
        names = [
            (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0]
            for n in tree.body
            if isinstance(n, (ast.Import, ast.ImportFrom))
        ]
        first_repo = min((i for i, m in enumerate(names) if m in repo), default=len(names))
        if "common" not in names[:first_repo]:
            late[f] = names
    assert len(scripts) >= 10 and not late, late
