"""Compact training (issue 21): the compact model trains like the masked dense one, and the
dense model (checkpoints, regroup, resume) sees the same weights."""

import csv
import os

import pytest
import torch
import torch.nn.functional as F

import imp_loop
import main_imp_fillback as mif
import pruning_utils as pu
from compact_train import CompactPhase, gather, mask_pairs, scatter_
from families import family_of, family_of_model
from models import create_model
from trainer import build_optimizer

SMALL = ["--dataset", "synthetic", "--synthetic_size", "96", "--batch_size", "32", "--device", "cpu"]
SMALL += ["--threads", "1", "--wandb", "disabled", "--epochs", "2", "--rate", "0.4"]
VIT = ["--arch", "vit_tiny", "--vit_structured", "--vit_prune_target", "both"]
CNN = ["--arch", "res20s"]
SGD = ["--optimizer", "sgd", "--lr", "0.05"]  # no Adam normalization of float-noise gradients: 1e-4 holds


def shallow(name, num_classes, img_size=32, **kw):
    """ViTs cut to 2 blocks: the end-to-end runs take seconds."""
    return create_model(name, num_classes, img_size, **({"depth": 2} if family_of(name).name == "vit" else {}), **kw)


def _dropped_masks(model):
    """Masks that drop whole units: ViT head 0 and 20 MLP neurons per block; CNN 3 filters per conv."""
    masks = pu.ones_masks(model)
    if hasattr(model, "blocks_layout"):
        for lay in model.blocks_layout():
            masks[lay.proj][:, : lay.head_dim] = False
            masks[lay.qkv].view(3, lay.num_heads, -1)[:, 0] = False
            masks[lay.fc1][:20] = False
            masks[lay.fc2][:, :20] = False
    else:
        for m in masks.values():
            if m.dim() == 4:
                m[:3] = False
    return masks


def _apply_hard(model, masks):
    """What the state loop does after every step: weights and the BN entries of dropped channels."""
    with torch.no_grad():
        torch._foreach_mul_(*mask_pairs(model, family_of_model(model), masks))


def _masked(arch):
    torch.manual_seed(0)
    model = shallow(arch, 10)
    masks = _dropped_masks(model)
    _apply_hard(model, masks)
    return model, masks


def _step(model, opt, x, y, masks):
    torch.manual_seed(1)  # drop path draws the same numbers in both forms
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    _apply_hard(model, masks)


def _kept(v, ix):
    kept = torch.zeros_like(v, dtype=torch.bool)
    scatter_(kept, torch.ones_like(gather(v, ix), dtype=torch.bool), ix)
    return kept


@pytest.mark.parametrize("arch", ["vit_tiny", "res20s"])
def test_compact_step_equals_masked_dense_step(arch):
    """A dense SGD step on both, then the next step compact on one: after sync the dense weights
    agree (momentum moved over by the same indices) and the weights compaction removes keep their values."""
    dense, masks = _masked(arch)
    family = family_of(arch)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    ref = shallow(arch, 10)
    ref.load_state_dict(dense.state_dict())
    ref_opt, opt = (build_optimizer(m, "sgd", 0.05, 0.9, 5e-4) for m in (ref, dense))
    _step(ref, ref_opt, x, y, masks)
    _step(dense, opt, x, y, masks)
    phase = CompactPhase.build(dense, masks, family)
    assert phase is not None and sum(p.numel() for p in phase.model.parameters()) < sum(
        p.numel() for p in dense.parameters()
    )
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    phase.adopt(opt)
    _step(ref, ref_opt, x, y, masks)
    _step(phase.model, opt, x, y, phase.hard)
    phase.sync()
    for k, v in ref.state_dict().items():
        kept = _kept(v, phase.ix(k))
        if k.endswith(("weight", "bias")):
            assert (dense.state_dict()[k] - v).abs()[kept].max() <= 1e-6, k
        assert torch.equal(dense.state_dict()[k][~kept], before[k][~kept]), k  # removed: values kept


def test_adamw_state_moves_by_the_same_indices():
    dense, masks = _masked("vit_tiny")
    opt = build_optimizer(dense, "adamw", 1e-3, 0.9, 0.05)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _step(dense, opt, x, y, masks)
    name_of = {id(p): n for n, p in dense.named_parameters()}
    names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]  # the state_dict's order
    old = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in dense.named_parameters()}
    phase = CompactPhase.build(dense, masks, family_of("vit_tiny"))
    phase.adopt(opt)
    for n, p in phase.model.named_parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
        assert torch.equal(opt.state[p]["exp_avg_sq"], gather(old[n]["exp_avg_sq"], phase.ix(n)))
    _step(phase.model, opt, x, y, phase.hard)
    state = phase.optimizer_state(opt)["state"]
    for i, n in enumerate(names):
        p = dense.get_parameter(n)
        kept = _kept(p, phase.ix(n))
        small = opt.state[phase.model.get_parameter(n)]
        assert torch.equal(state[i]["exp_avg"][~kept], old[n]["exp_avg"][~kept])  # removed: unchanged
        assert torch.equal(gather(state[i]["exp_avg"], phase.ix(n)), small["exp_avg"])
        assert int(state[i]["step"]) == 2


def _run(tmp, name, *flags):
    d = str(tmp / name)
    assert mif.main(SMALL + list(flags) + ["--save_dir", d]) == 0
    return d


def _ck(d, state):
    return torch.load(os.path.join(d, f"{state}checkpoint.pth.tar"), map_location="cpu", weights_only=True)


def _rows(d):
    with open(os.path.join(d, "summary.csv")) as f:
        return list(csv.DictReader(f))


def _max_kept_dw(a, b):
    """Max |w_a - w_b| over the prunable weights alive in the hard mask (they must agree)."""
    return max(
        float((a["state_dict"][f"{n}.weight"] - b["state_dict"][f"{n}.weight"])[m].abs().max())
        for n, m in a["mask"].items()
    )


@pytest.fixture
def shallow_vit(monkeypatch):
    monkeypatch.setattr(imp_loop, "create_model", shallow)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [VIT + SGD, CNN], ids=["vit_tiny", "res20s"])
def test_refill_auto_equals_off(tmp_path, shallow_vit, flags, capsys):
    """Refill, 3 states: state 1 trains compact; weights within 1e-4, identical masks at the next regroup."""
    run = ["--struct", "refill", "--pruning_times", "3"] + flags
    off = _run(tmp_path, "off", *run, "--compact_train", "off")
    assert "trains the compact model" not in capsys.readouterr().out
    auto = _run(tmp_path, "auto", *run, "--compact_train", "auto")
    out = capsys.readouterr().out
    assert "state  1 trains the compact model" in out and "trains compact ==" in out
    a, b = _ck(off, 1), _ck(auto, 1)
    params = [k for k in a["state_dict"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in params) <= 1e-4
    for s in (1, 2):  # state 2's masks come from the regroup after state 1
        assert all(torch.equal(_ck(off, s)["mask"][n], _ck(auto, s)["mask"][n]) for n in a["mask"])
    rows_off, rows_auto = _rows(off), _rows(auto)
    assert [r["train_mac_ratio"] for r in rows_off] == ["1.0"] * 3
    assert rows_auto[0]["train_mac_ratio"] == "1.0" and 0 < float(rows_auto[2]["train_mac_ratio"]) < 1


@pytest.mark.slow
def test_rsst_switches_at_removal(tmp_path, shallow_vit, capsys):
    run = VIT + SGD + ["--struct", "rsst", "--pruning_times", "2", "--reg_end", "0.5"]
    off = _run(tmp_path, "off", *run, "--compact_train", "off")
    assert "trains the compact model" not in capsys.readouterr().out
    auto = _run(tmp_path, "auto", *run, "--compact_train", "auto")
    out = capsys.readouterr().out
    assert "trains compact from the RSST removal" in out
    assert out.index("state  1 RSST removal at step") < out.index("state  1 trains the compact model")
    a, b = _ck(off, 1), _ck(auto, 1)
    assert all(torch.equal(a["mask"][n], b["mask"][n]) for n in a["mask"])
    assert _max_kept_dw(a, b) <= 1e-4
    assert float(_rows(auto)[1]["train_mac_ratio"]) < 1


@pytest.mark.slow
@pytest.mark.parametrize("flags", [VIT, CNN], ids=["vit_tiny", "res20s"])
def test_kill_and_resume_inside_compact_phase_is_bit_identical(tmp_path, monkeypatch, shallow_vit, flags):
    run = ["--struct", "refill", "--pruning_times", "2", "--compact_train", "auto"] + flags
    full = _run(tmp_path, "full", *run)
    steps = []

    def stop_at_step_8(self):  # state 1 (steps 7-12), mid-epoch 1: compact phase
        if self.global_step == 8:
            steps.append(self.phase is not None)
            self.stop_signal = 15
            return True
        return False

    d = str(tmp_path / "killed")
    with monkeypatch.context() as patch:
        patch.setattr(imp_loop.IMPRun, "_should_stop", stop_at_step_8)
        assert mif.main(SMALL + run + ["--save_dir", d]) == 128 + 15
    assert steps == [True]
    assert mif.main(["--resume", "--save_dir", d, "--threads", "1", "--wandb", "disabled", "--device", "cpu"]) == 0
    a, b = _ck(full, 1), _ck(d, 1)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for i, s in a["optimizer"]["state"].items():
        assert all(torch.equal(s[k], b["optimizer"]["state"][i][k]) for k in s)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(_rows(full)) == strip(_rows(d))
