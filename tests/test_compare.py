"""compare.py, mask_plots.py and sweeps/: three short synthetic ViT runs compared, refused mixes,
mask pictures whose unit counts match the checkpoints, and the sweep scripts' commands."""

import itertools
import json
import os
import shutil
import subprocess

import pytest
import torch
import yaml

import compare
import imp_loop
import main_imp_fillback as mif
import mask_plots as mp
import models
import pruning_utils as pu
from models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--arch",
    "vit_tiny",
    "--dataset",
    "synthetic",
    "--synthetic_size",
    "64",
    "--batch_size",
    "32",
    "--epochs",
    "1",
    "--pruning_times",
    "2",
    "--wandb",
    "disabled",
    "--device",
    "cpu",
]
KINDS = {
    "unstructured": [],
    "refill": ["--struct", "refill", "--vit_structured", "--vit_prune_target", "both", "--rate", "0.3"],
    "rsst": ["--struct", "rsst", "--vit_structured", "--vit_prune_target", "both", "--rate", "0.3"],
}
DEPTH = 2  # ViT-Tiny's width, heads and MLP at depth 2: the three runs take seconds, not minutes


def shallow_model(name, num_classes, img_size=32, **kw):
    """create_model with ViTs cut to DEPTH blocks."""
    return create_model(name, num_classes, img_size, **({"depth": DEPTH} if models.is_vit(name) else {}), **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three runs, once per module, on depth-DEPTH ViT-Tiny (kept for the module's tests): kind -> save dir."""
    base = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(imp_loop, "create_model", shallow_model)
        patch.setattr(models, "create_model", shallow_model)  # compare.masks_png_from_run builds the model
        dirs = {}
        for kind, flags in KINDS.items():
            dirs[kind] = str(base / kind)
            assert mif.main(SMALL + flags + ["--save_dir", dirs[kind]]) == 0
        yield dirs


def table_rows(md_path):
    """The Markdown table of compare.py as a header and a list of row cell lists."""
    with open(md_path) as f:
        lines = [line for line in f if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    return split(lines[0]), [split(line) for line in lines[2:]]


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_three_runs_png_and_table(runs, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    assert compare.main([runs["unstructured"], runs["refill"], runs["rsst"], "--out", out]) == 0
    assert is_png(out + ".png") and os.path.getsize(out + ".png") > 10_000
    header, rows = table_rows(out + ".md")
    assert [h for h in header if h.startswith("state ")] == ["state 0", "state 1"]
    assert len(rows) == 3 and all(len(r) == len(header) for r in rows)
    methods = [r[header.index("method")] for r in rows]
    assert methods == ["IMP-unstructured", "Refill", "RSST"]
    labels = [r[0] for r in rows]
    assert len(set(labels)) == 3 and all(m in lab for m, lab in zip(methods, labels))
    for run_dir, row in zip((runs["unstructured"], runs["refill"], runs["rsst"]), rows):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        for s in summary:  # each cell shows that state's ticket accuracy and remaining weights
            assert row[header.index(f"state {s['state']}")].startswith(f"{s['final_test_acc']:.2f} (")
        assert row[-1].startswith(f"{compare.best_state(summary)['state']}:")


@pytest.mark.slow
def test_run_labels_name_method_criterion_rate(runs):
    labels = {k: compare.load_run(d).label for k, d in runs.items()}
    assert labels["unstructured"].startswith("IMP-unstructured") and "0.2" in labels["unstructured"]
    assert labels["refill"].startswith("Refill magnitude rate 0.3") and "both" in labels["refill"]
    assert labels["rsst"].startswith("RSST magnitude rate 0.3") and "both" in labels["rsst"]


def _copy_run(src, dst, **config):
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "summary.json"), dst)
    with open(os.path.join(src, "args.yaml")) as f:
        cfg = yaml.safe_load(f)
    with open(os.path.join(dst, "args.yaml"), "w") as f:
        yaml.safe_dump({**cfg, **config}, f)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("key,value", [("dataset", "cifar100"), ("arch", "res20s")])
def test_mixed_runs_refused_unless_allowed(runs, tmp_path, capsys, key, value):
    other = _copy_run(runs["rsst"], str(tmp_path / "other"), **{key: value})
    out = str(tmp_path / "mixed")
    assert compare.main([runs["rsst"], other, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"mix {key}s" in err and "--allow_mixed" in err
    assert not os.path.exists(out + ".png") and not os.path.exists(out + ".md")
    assert compare.main([runs["rsst"], other, "--out", out, "--allow_mixed"]) == 0
    _, rows = table_rows(out + ".md")
    assert len({r[0] for r in rows}) == 2  # equal labels get the folder name


@pytest.mark.parametrize("make", ["missing_dir", "no_summary", "empty_summary"])
def test_bad_run_dirs_exit_2_with_one_line(tmp_path, capsys, make):
    d = tmp_path / "run"
    if make != "missing_dir":
        d.mkdir()
        (d / "args.yaml").write_text("arch: vit_tiny\ndataset: synthetic\n")
    if make == "empty_summary":
        (d / "summary.json").write_text("[]")
    assert compare.main([str(d), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_best_state_prefers_pruned_states():
    rows = [
        {"state": 0, "final_test_acc": 90.0},
        {"state": 1, "final_test_acc": 70.0},
        {"state": 2, "final_test_acc": 80.0},
    ]
    assert compare.best_state(rows)["state"] == 2
    assert compare.best_state(rows[:1])["state"] == 0


def _heads_alive_from_qkv(mask, layout):
    """Heads with any qkv weight alive, read directly off the [3, heads, head_dim, in] layout."""
    qkv = mask[layout.qkv].reshape(3, layout.num_heads, layout.head_dim, -1)
    proj = mask[layout.proj].reshape(-1, layout.num_heads, layout.head_dim)
    return int((qkv.any(dim=(0, 2, 3)) | proj.any(dim=(0, 2))).sum())


@pytest.mark.slow
def test_plot_masks_counts_match_checkpoints(runs, tmp_path):
    model = shallow_model("vit_tiny", 10, 32)
    masks = mp.load_state_masks(runs["rsst"])
    assert len(masks) == 2
    path = str(tmp_path / "masks.png")
    table = mp.plot_masks(path, "vit_tiny rsst", masks, model)
    assert is_png(path)
    assert set(table) == {"heads", "neurons"}
    assert all(len(per_state) == DEPTH for kind in table.values() for per_state in kind)
    with open(os.path.join(runs["rsst"], "summary.json")) as f:
        summary = json.load(f)
    for state, row in enumerate(summary):
        assert f"{sum(table['heads'][state])}/{3 * DEPTH}" == row["heads_kept"]
        assert f"{sum(table['neurons'][state])}/{384 * DEPTH}" == row["neurons_kept"]
        assert table["heads"][state] == [_heads_alive_from_qkv(masks[state], b) for b in model.blocks_layout()]
    assert table["heads"][0] == [3] * DEPTH and table["neurons"][0] == [384] * DEPTH
    assert sum(table["heads"][1]) < 3 * DEPTH  # the head-level regroup dropped whole heads
    for kind in table.values():  # units only disappear across states
        assert all(b <= a for a, b in zip(kind[0], kind[1]))


@pytest.mark.slow
def test_masks_png_from_finished_run(runs):
    path = compare.masks_png_from_run(runs["refill"])
    assert path == os.path.join(runs["refill"], "masks.png") and is_png(path)


def _zero_units(mask, group, units):
    for m in group.members:
        view = mask[m.name].view(m.shape).movedim(m.axis, 0)
        view[units] = False


def test_units_kept_counts_whole_and_partial_units():
    model = shallow_model("vit_tiny", 10, 32)
    mask = {n: torch.ones_like(w, dtype=torch.bool) for n, w in pu.prunable_weights(model).items()}
    kinds = mp.unit_kinds(model)
    _zero_units(mask, kinds["heads"][0], [1])
    _zero_units(mask, kinds["neurons"][1], list(range(10)))
    qkv = kinds["heads"][1].members[0]
    mask[qkv.name].view(qkv.shape)[:, 2] = False  # head 2 of block 1: proj columns still alive
    assert pu.units_kept(kinds["heads"], mask) == [2, 3]
    assert pu.units_kept(kinds["neurons"], mask) == [384, 374]
    as_float = {n: m.float() for n, m in mask.items()}
    assert pu.units_kept(kinds["neurons"], as_float) == [384, 374]


def test_plot_masks_cnn_channels(tmp_path):
    model = create_model("res20s", 10, 32, width=4)
    groups = mp.unit_kinds(model)
    mask = {n: torch.ones_like(w, dtype=torch.bool) for n, w in pu.prunable_weights(model).items()}
    pruned = {n: m.clone() for n, m in mask.items()}
    _zero_units(pruned, groups["channels"][0], [0, 1])
    table = mp.plot_masks(str(tmp_path / "masks.png"), "res20s", [mask, pruned], groups)
    sizes = [g.num_units for g in groups["channels"]]
    assert table == {"channels": [sizes, [sizes[0] - 2] + sizes[1:]]}
    assert is_png(str(tmp_path / "masks.png"))


def test_wandb_sweep_grid_parses_as_main_flags():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    with open(os.path.join(ROOT, "sweeps", "wandb_sweep.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["program"] == "main_imp_fillback.py" and cfg["method"] == "grid"
    command = cfg["command"]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"] and command[-1] == "${args}"
    assert "--vit_structured" in command and "vit_structured" not in cfg["parameters"]
    params = cfg["parameters"]
    assert params["criteria"]["values"] == ["remain", "magnitude", "l1", "l2", "saliency"]
    assert params["rate"]["values"] == [0.2, 0.3, 0.4, 0.5]
    grid = [k for k in params if "values" in params[k]]
    fixed = {k: {"value": v["value"]} for k, v in params.items() if "value" in v}
    for combo in itertools.product(*(params[k]["values"] for k in grid)):
        flags = create_sweep_command_args({"args": {**fixed, **{k: {"value": v} for k, v in zip(grid, combo)}}})
        args = mif.parse_args(command[3:-1] + flags["args"])
        mif.validate(args)
        assert (args.arch, args.dataset, args.struct, args.vit_structured) == ("vit_tiny", "cifar100", "rsst", True)
        assert (args.criteria, args.rate) == combo


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "script,values,flag",
    [
        ("criteria.sh", ["remain", "magnitude", "l1", "l2", "saliency"], "--criteria"),
        ("rates.sh", ["0.2", "0.3", "0.4", "0.5"], "--rate"),
    ],
)
def test_sweep_scripts_run_the_seed_loops_then_compare(tmp_path, script, values, flag):
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "sweep")}
    subprocess.run(["bash", os.path.join(ROOT, "sweeps", script), "--batch_size", "64"], env=env, check=True)
    *runs_, last = log.read_text().splitlines()
    assert len(runs_) == len(values)
    dirs = []
    for line, value in zip(runs_, values):
        argv = line.split()
        assert argv[0] == "main_imp_fillback.py" and argv[argv.index(flag) + 1] == value
        for f, default in (
            ("--dataset", "cifar100"),
            ("--epochs", "80"),
            ("--pruning_times", "20"),
            ("--arch", "vit_tiny"),
            ("--struct", "rsst"),
            ("--batch_size", "64"),
        ):
            assert argv[argv.index(f) + 1] == default
        assert "--vit_structured" in argv and "--resume" not in argv
        dirs.append(argv[argv.index("--save_dir") + 1])
    assert len(set(dirs)) == len(values) and all(d.startswith(str(tmp_path / "sweep")) for d in dirs)
    assert last.split() == ["compare.py", *dirs, "--out", str(tmp_path / "sweep" / "compare")]


def test_rsst_labels_name_the_penalty_settings_that_differ_from_the_defaults():
    base = {
        "struct": "rsst",
        "arch": "vit_tiny",
        "vit_structured": True,
        "vit_prune_target": "both",
        "criteria": "magnitude",
        "rate": 0.3,
        **compare.RSST_DEFAULTS,
    }
    assert compare.Run("a", base, []).label == "RSST magnitude rate 0.3 target both"
    ablation = {**base, "reg_end": 0.3, "reg_scale_updates": "off", "RST_schedule": "x"}
    label = compare.Run("b", ablation, []).label
    assert "reg_end 0.3" in label and "reg_scale_updates off" in label and "RST_schedule x" in label
    assert "reg_mode" not in label and "exponents" not in label
    refill = {**ablation, "struct": "refill"}
    assert "reg_end" not in compare.Run("c", refill, []).label  # Refill has no penalty


@pytest.mark.parametrize(
    "config, method",
    [
        ({"arch": "vit_tiny", "struct": "rsst"}, "IMP-unstructured"),  # a ViT regroups only with --vit_structured
        ({"arch": "timm:deit_tiny_patch16_224", "struct": "rsst"}, "IMP-unstructured"),
        ({"arch": "timm:deit_tiny_patch16_224", "struct": "refill", "vit_structured": True}, "Refill"),
        ({"arch": "res20s", "struct": "rsst"}, "RSST"),  # CNNs and Mamba regroup by default
        ({"arch": "mamba_tiny", "struct": "refill"}, "Refill"),
        ({"arch": "mamba_tiny", "struct": "rsst", "unstructured": True}, "IMP-unstructured"),
    ],
)
def test_method_follows_the_archs_family(config, method):
    assert compare.Run("unused", config, []).method == method
