"""End-to-end runs of main_imp_fillback.py on synthetic data: outputs, masks, exit codes, resume."""

import csv
import os

import pytest
import torch
import yaml

import imp_loop
import main_imp_fillback as mif
import pruning_utils as pu
from models import create_model
from trainer import NonFiniteLoss
from vit_pruning_utils import head_groups, neuron_groups


def load(save_dir, state):
    return torch.load(os.path.join(save_dir, f"{state}checkpoint.pth.tar"), map_location="cpu", weights_only=True)


def masks_of(ck, key="hard"):
    return {n: m.float() for n, m in ck["masks"][key].items()}


def summary_rows(save_dir):
    with open(os.path.join(save_dir, "summary.csv")) as f:
        return list(csv.DictReader(f))


def same_masks(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def make_run(*argv):
    """An IMPRun built the way the CLI builds one (parse, validate, resolve), without running it."""
    args = mif.parse_args(list(argv) + ["--wandb", "disabled", "--device", "cpu"])
    mif.validate(args)
    mif.resolve(args)
    os.makedirs(args.save_dir, exist_ok=True)
    return imp_loop.IMPRun(args, None)


def assert_masked_weights_zero(ck):
    for name, m in ck["mask"].items():
        w = ck["state_dict"][f"{name}.weight"]
        assert bool((w[~m] == 0).all()), name


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--unstructured"]], ids=["rsst-channels", "unstructured"])
def test_res20s_four_states_outputs_and_densities(run_main, extra):
    rc, d, _ = run_main("--arch", "res20s", "--pruning_times", "4", "--epochs", "1", "--rate", "0.2", *extra)
    assert rc == 0
    assert len(summary_rows(d)) == 4
    for f in ("init.pth.tar", "args.yaml", "summary.json", "summary.png", "0_curves.png"):
        assert os.path.isfile(os.path.join(d, f)), f
    model = create_model("res20s", 10, 32)
    previous = None
    for k in range(4):
        assert os.path.isfile(os.path.join(d, f"{k}model_SA_best.pth.tar"))
        ck = load(d, k)
        assert abs(pu.density(masks_of(ck, "imp")) - 0.8**k) < 0.002
        assert_masked_weights_zero(ck)
        hard = masks_of(ck)
        assert same_masks(hard, masks_of(ck, "target"))
        if extra:
            assert abs(pu.density(hard) - 0.8**k) < 0.002
        else:
            assert pu.units_all_or_nothing(pu.channel_groups(model), hard)
        if previous is not None:  # masks only shrink across states
            assert all(bool((hard[n] <= previous[n]).all()) for n in hard)
        previous = hard


def _vit_run(run_main, struct, *extra):
    rc, d, _ = run_main(
        "--arch",
        "vit_tiny",
        "--struct",
        struct,
        "--vit_structured",
        "--vit_prune_target",
        "both",
        "--rate",
        "0.3",
        "--pruning_times",
        "3",
        "--epochs",
        "1",
        *extra,
    )
    assert rc == 0
    return d


@pytest.mark.slow
@pytest.mark.parametrize("struct", ["refill", "rsst"])
def test_vit_head_and_neuron_masks_are_quasi_structured(run_main, shallow_vits, struct):
    d = _vit_run(run_main, struct)
    model = create_model("vit_tiny", 10, 32, depth=shallow_vits)
    for k in (1, 2):
        ck = load(d, k)
        hard = masks_of(ck)
        assert pu.units_all_or_nothing(head_groups(model) + neuron_groups(model), hard)
        for g in head_groups(model):
            assert int(pu.unit_alive(g, hard).sum()) >= 1  # every layer keeps a head
            sparsity = 1 - float(hard[g.layer].mean())
            assert abs(sparsity * 3 - round(sparsity * 3)) < 1e-6  # a multiple of 1/3
        for b in model.blocks_layout():
            assert torch.equal(hard[b.fc1].bool().any(1), hard[b.fc2].bool().any(0))
        assert_masked_weights_zero(ck)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["x", "x^2", "x^3", "exp", "exp_custom", "exp_custom_exponents"])
def test_rsst_raw_lambda_grows_to_strength_and_penalized_norm_falls(run_main, schedule):
    rc, d, _ = run_main(
        "--arch",
        "res20s",
        "--RST_schedule",
        schedule,
        "--pruning_times",
        "2",
        "--epochs",
        "2",
        "--reg_mode",
        "raw",
        "--reg_granularity_prune",
        "2.0",
    )
    assert rc == 0
    ck = load(d, 1)
    trace = ck["state_progress"]["trace"]
    lambdas, norms = trace["lambda"], trace["norm"]
    assert lambdas[0] < 0.6 * 2.0 and lambdas[-1] == pytest.approx(2.0)
    assert all(b >= a for a, b in zip(lambdas, lambdas[1:]))
    assert norms[-1] < 1.0
    assert same_masks(masks_of(ck), masks_of(ck, "target"))  # the saved state mask is R
    row = summary_rows(d)[1]
    assert (
        row["soft_test_acc"] != "" and row["hard_test_acc"] != "" and float(row["final_lambda"]) == pytest.approx(2.0)
    )
    assert int(row["reg_end_step"]) == ck["state_progress"]["removal"]["step"] == 6  # raw: at the state end
    assert pu.count_ones(masks_of(load(d, 1), "penalty")) > 0


@pytest.mark.slow
def test_rsst_calibrated_removes_at_reg_end_then_recovers(run_main):
    """Calibrated RSST: the ramp ends and P is removed at round(reg_end * T); training goes on under R;
    the best checkpoint is an epoch after the removal; the norm ratio at removal is near the target."""
    rc, d, _ = run_main("--arch", "res20s", "--pruning_times", "2", "--epochs", "4", "--reg_end", "0.5")
    assert rc == 0
    ck = load(d, 1)
    steps = ck["epoch"] * 3  # 96 images, batch 32, drop_last: 3 steps per epoch
    removal = ck["state_progress"]["removal"]
    assert removal["step"] == round(0.5 * steps) == 6
    assert ck["state_progress"]["trace"]["step"][-1] == 6  # the penalty stopped at the removal
    assert removal["norm_ratio"] < 1e-2
    trace = ck["state_progress"]["trace"]
    assert len(trace["planned"]) == len(trace["norm"]) and trace["planned"][-1] == pytest.approx(1e-3, rel=1e-3)
    assert all(b <= a for a, b in zip(trace["planned"], trace["planned"][1:]))
    history = ck["state_progress"]["history"]
    assert [h["reg_lambda"] > 0 for h in history] == [True, False, False, False]  # epoch 2 holds the removal
    assert history[-1]["lr"] > 0 and len(history) == 4  # recovery: epochs 3 and 4 trained under R
    row = summary_rows(d)[1]
    assert int(row["best_epoch"]) >= 2 and float(row["predicted_norm_ratio"]) == pytest.approx(1e-3, rel=1e-3)
    assert abs(float(row["soft_test_acc"]) - float(row["hard_test_acc"])) <= 5  # a removal of ~nothing
    best = torch.load(os.path.join(d, "1model_SA_best.pth.tar"), map_location="cpu", weights_only=True)
    assert same_masks(best["mask"], ck["masks"]["target"])  # the best ticket has the state's structure
    assert "optimizer" not in best  # weights and mask only


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, mode, scaled",
    [("vit_tiny", "auto", True), ("vit_tiny", "off", False), ("res20s", "auto", False), ("res20s", "on", True)],
)
def test_reg_scale_updates_auto_is_on_for_adamw_only(tmp_path, capsys, shallow_vits, arch, mode, scaled):
    rc = mif.main(
        [
            "--dataset",
            "synthetic",
            "--synthetic_size",
            "96",
            "--batch_size",
            "32",
            "--device",
            "cpu",
            "--arch",
            arch,
            "--pruning_times",
            "2",
            "--epochs",
            "1",
            "--reg_scale_updates",
            mode,
            "--save_dir",
            str(tmp_path / "run"),
            "--wandb",
            "disabled",
            *(["--vit_structured"] if arch == "vit_tiny" else []),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "RSST (calibrated)" in out
    assert ("optimizer steps on P scaled by the planned norm" in out) == scaled


@pytest.mark.slow
def test_dropped_channels_bn_entries_are_zero_after_rewind_and_steps(refill_run, tmp_path):
    d = refill_run
    model = create_model("res20s", 10, 32)
    norms = model.conv_norms()
    for name in ("1checkpoint.pth.tar", "1model_SA_best.pth.tar"):
        ck = torch.load(os.path.join(d, name), map_location="cpu", weights_only=True)
        dropped = 0
        for g in pu.channel_groups(model):
            dead = ~pu.unit_alive(g, {n: m.float() for n, m in ck["mask"].items()})
            dropped += int(dead.sum())
            for key in ("weight", "bias"):
                assert bool((ck["state_dict"][f"{norms[g.layer]}.{key}"][dead] == 0).all()), (name, g.layer)
        assert dropped > 0
    run = make_run(
        "--arch",
        "res20s",
        "--dataset",
        "synthetic",
        "--synthetic_size",
        "64",
        "--save_dir",
        str(tmp_path / "rewound"),
    )
    run.set_ticket(imp_loop.Ticket.from_saved(load(d, 1)["masks"], "cpu"))
    run.rewind()  # theta_r has gamma = 1 everywhere; the rewind must kill the dropped channels again
    state = run.model.state_dict()
    g = pu.channel_groups(run.model)[0]
    dead = ~pu.unit_alive(g, run.ticket.hard)
    assert bool(dead.any()) and float(state[f"{norms[g.layer]}.weight"][dead].abs().sum()) == 0.0


@pytest.mark.slow
def test_same_seed_same_masks_and_config_replay(run_main, tmp_path):
    flags = ("--arch", "res20s", "--pruning_times", "2", "--epochs", "1", "--criteria", "l1")
    _, a, _ = run_main(*flags, save_dir=tmp_path / "a")
    rc, c, _ = run_main("--config", os.path.join(a, "args.yaml"), save_dir=tmp_path / "c", small=False)
    assert rc == 0
    ma, mc = (masks_of(load(x, 1)) for x in (a, c))
    assert same_masks(ma, mc)  # a second run of the same seed and config, its flags replayed from args.yaml
    _, e, _ = run_main(*flags, "--seed", "0", save_dir=tmp_path / "e")
    me = masks_of(load(e, 1))
    assert not same_masks(ma, me)


def test_rewind_restores_every_parameter_and_buffer_without_aliasing(tmp_path):
    run = make_run(
        "--arch", "res20s", "--dataset", "synthetic", "--synthetic_size", "64", "--save_dir", str(tmp_path / "r")
    )
    before = {k: v.clone() for k, v in run.theta_r.items()}
    run.model.train()
    opt = torch.optim.SGD(run.model.parameters(), lr=0.5)
    run.model(torch.randn(8, 3, 32, 32)).sum().backward()
    opt.step()
    state = run.model.state_dict()
    assert not torch.equal(state["bn1.running_mean"], before["bn1.running_mean"])
    assert all(torch.equal(run.theta_r[k], before[k]) for k in before)  # theta_r not aliased
    run.rewind()
    assert all(torch.equal(run.model.state_dict()[k].cpu(), before[k]) for k in before)
    with torch.no_grad():
        run.model.conv1.weight.add_(1.0)
    assert torch.equal(run.theta_r["conv1.weight"], before["conv1.weight"])


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(run_main, tmp_path, monkeypatch):
    flags = ("--arch", "res20s", "--pruning_times", "3", "--epochs", "2", "--criteria", "saliency")
    _, full, _ = run_main(*flags, save_dir=tmp_path / "full")
    calls = {"n": 0}
    real = imp_loop.train_one_epoch

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # second epoch of state 1: after one epoch checkpoint of that state
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(imp_loop, "train_one_epoch", dying)
    rc, _, err = run_main(*flags, save_dir=tmp_path / "cut")
    assert rc == 130 and "--resume" in err
    monkeypatch.setattr(imp_loop, "train_one_epoch", real)
    rc, cut, _ = run_main("--resume", save_dir=tmp_path / "cut", small=False)
    assert rc == 0
    for k in range(3):
        a, b = load(full, k), load(cut, k)
        assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in a["state_dict"])
        assert same_masks(a["mask"], b["mask"]) and same_masks(a["masks"]["imp"], b["masks"]["imp"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(summary_rows(full)) == strip(summary_rows(cut))


BAD_INPUTS = [
    (["--arch", "resnet9000"], "--arch"),
    (["--dataset", "mnist"], "--dataset"),
    (["--criteria", "random"], "--criteria"),
    (["--struct", "prune"], "--struct"),
    (["--sorting_mode", "random"], "--sorting_mode"),
    (["--prune_type", "late"], "--prune_type"),
    (["--vit_prune_target", "heads"], "--vit_prune_target"),
    (["--wandb", "cloud"], "--wandb"),
    (["--rate", "0"], "--rate"),
    (["--rate", "1.5"], "--rate"),
    (["--rate", "abc"], "--rate"),
    (["--epochs", "0"], "--epochs"),
    (["--pruning_times", "0"], "--pruning_times"),
    (["--batch_size", "0"], "--batch_size"),
    (["--fillback_rate", "2"], "--fillback_rate"),
    (["--calib_batches", "0"], "--calib_batches"),
    (["--exponents", "0"], "--exponents"),
    (["--reg_granularity_prune", "-1"], "--reg_granularity_prune"),
    (["--lr", "-0.1"], "--lr"),
    (["--decreasing_lr", "a,b"], "--decreasing_lr"),
    (["--prune_type", "rewind_lt", "--rewind_epoch", "5", "--epochs", "2"], "--rewind_epoch"),
    (["--vit_structured"], "--vit_structured"),
    (["--RST_schedule", "cubic"], "--RST_schedule"),
    (["--init", "/nonexistent/init.pth.tar"], "--init"),
    (["--prune_type", "pt"], "--pretrained"),
    (["--config", "/nonexistent/args.yaml"], "--config"),
    (["--checkpoint", "/nonexistent/ck.pth.tar", "--resume"], "--checkpoint"),
    (["--resume", "--overwrite"], "--overwrite"),
    (["--device", "tpu"], "--device"),
    (["--unknown_flag", "1"], "unrecognized"),
]


@pytest.mark.parametrize("flags,needle", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(run_main, flags, needle):
    rc, d, err = run_main(*flags)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err
    assert not os.path.exists(os.path.join(d, "0checkpoint.pth.tar"))


def test_missing_cifar_without_network_exits_2(run_main, tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self, *a, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvd.CIFAR100, "download", offline)
    rc, _, err = run_main("--dataset", "cifar100", "--data", str(tmp_path / "nodata"), small=False)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cifar-100" in err


@pytest.mark.slow
def test_resume_with_nothing_to_resume_and_existing_run_are_refused(run_main, tmp_path):
    rc, _, err = run_main("--resume", save_dir=tmp_path / "empty")
    assert rc == 2 and "nothing to resume" in err
    rc, d, _ = run_main("--arch", "res20s", "--pruning_times", "1", "--epochs", "1", save_dir=tmp_path / "x")
    assert rc == 0
    stamp = os.path.getmtime(os.path.join(d, "0checkpoint.pth.tar"))
    rc, _, err = run_main("--arch", "res20s", "--pruning_times", "1", "--epochs", "1", save_dir=tmp_path / "x")
    assert rc == 2 and "--overwrite" in err
    assert os.path.getmtime(os.path.join(d, "0checkpoint.pth.tar")) == stamp
    rc, _, _ = run_main(
        "--arch", "res20s", "--pruning_times", "1", "--epochs", "1", "--overwrite", save_dir=tmp_path / "x"
    )
    assert rc == 0


def test_non_finite_loss_exits_1_and_keeps_earlier_files(run_main, tmp_path):
    rc, d, err = run_main("--arch", "res20s", "--pruning_times", "2", "--epochs", "2", "--lr", "1e30")
    assert rc == 1 and "Last good checkpoint" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(d, "0checkpoint.pth.tar"))


@pytest.mark.slow
def test_non_finite_loss_later_keeps_good_checkpoints(run_main, monkeypatch):
    calls = {"n": 0}
    real = imp_loop.train_one_epoch

    def explode_in_state_1(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise NonFiniteLoss("training loss is nan")
        return real(*a, **kw)

    monkeypatch.setattr(imp_loop, "train_one_epoch", explode_in_state_1)
    rc, d, err = run_main("--arch", "res20s", "--pruning_times", "2", "--epochs", "2")
    assert rc == 1 and os.path.join(d, "latest.pth.tar") in err
    assert load(d, 0)["phase"] == "done" and len(summary_rows(d)) == 1
    assert not os.path.exists(os.path.join(d, "1checkpoint.pth.tar"))


@pytest.mark.slow
def test_args_yaml_is_resolved_config(run_main, shallow_vits):
    rc, d, _ = run_main("--arch", "vit_tiny", "--pruning_times", "1", "--epochs", "1")
    assert rc == 0
    with open(os.path.join(d, "args.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["optimizer"] == "adamw" and cfg["lr"] == 1e-3 and cfg["label_smoothing"] == 0.1
    assert cfg["exp_name"].startswith("rsst_vit_tiny_synthetic_exp_custom_exponents_reg1_exp4_magnitude_rate0.2")


def test_bad_files_and_dirs_exit_2(run_main, tmp_path):
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint")
    rc, _, err = run_main("--init", str(garbage), save_dir=tmp_path / "a")
    assert rc == 2 and "--arch" in err and len(err.strip().splitlines()) == 1
    blocked = tmp_path / "file_not_dir"
    blocked.write_text("x")
    rc, _, err = run_main(save_dir=blocked)
    assert rc == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("rate: 0.3\nnot_a_flag: 1\n")
    rc, _, err = run_main("--config", str(cfg), save_dir=tmp_path / "b")
    assert rc == 2 and "not_a_flag" in err


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_arch(run_main, refill_run, tmp_path):
    ck = os.path.join(refill_run, "0checkpoint.pth.tar")
    rc, _, err = run_main("--resume", "--checkpoint", ck, "--arch", "vit_tiny", save_dir=tmp_path / "r", small=False)
    assert rc == 2 and "--arch vit_tiny" in err and "res20s" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_rewind_lt_and_pt_rewind_points(run_main, tmp_path):
    rc, d, _ = run_main(
        "--arch",
        "res20s",
        "--pruning_times",
        "2",
        "--epochs",
        "2",
        "--prune_type",
        "rewind_lt",
        "--rewind_epoch",
        "1",
        save_dir=tmp_path / "rw",
    )
    assert rc == 0
    init = torch.load(os.path.join(d, "init.pth.tar"), weights_only=True)["state_dict"]
    rewind = torch.load(os.path.join(d, "rewind.pth.tar"), weights_only=True)["state_dict"]
    assert not torch.equal(init["layers.0.0.conv1.weight"], rewind["layers.0.0.conv1.weight"])
    rc, p, _ = run_main(
        "--arch",
        "res20s",
        "--pruning_times",
        "1",
        "--epochs",
        "1",
        "--prune_type",
        "pt",
        "--pretrained",
        os.path.join(d, "0checkpoint.pth.tar"),
        save_dir=tmp_path / "pt",
    )
    assert rc == 0
    start = torch.load(os.path.join(p, "init.pth.tar"), weights_only=True)["state_dict"]
    trained = load(d, 0)["state_dict"]
    assert all(torch.equal(start[k], trained[k]) for k in trained)


def test_command_line_choices_match_the_implementations():
    import dataset
    import pruning_utils as pu
    import rsst
    import vit_pruning_utils as vpu

    assert set(mif.DATASETS) == set(dataset.DATASETS)
    assert sorted(mif.CRITERIA) == sorted(pu.CRITERIA)
    assert sorted(mif.SCHEDULES) == sorted(rsst.SCHEDULES)
    assert tuple(mif.VIT_TARGETS) == tuple(vpu.VIT_TARGETS)


@pytest.mark.parametrize("flags", [["--arch", "nosuch"], ["--prunning_times", "3"], ["--help"]])
def test_argument_errors_and_help_come_before_torch_loads(flags):
    import subprocess
    import sys

    code = (
        "import sys; import main_imp_fillback as m\n"
        "try:\n    rc = m.main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        "sys.exit(rc if 'torch' not in sys.modules else 99)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, *flags],
        cwd=os.path.dirname(os.path.dirname(__file__)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == (0 if flags == ["--help"] else 2), p.stderr
