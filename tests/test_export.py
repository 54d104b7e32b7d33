"""export.py: compact models match the masked ones, are smaller, and reload from the file alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import export
import pruning_utils as pu
from compact import FoldedConv2d
from models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HD = 64  # vit_tiny head dim


# ------------------------------------------------------------------------------ helpers
def trained_like(name: str, seed: int = 0, **kw) -> nn.Module:
    """A small model with every parameter and BN statistic moved away from its init, so
    removed channels carry nonzero constants (relu(bn(0)) > 0) that must be folded."""
    torch.manual_seed(seed)
    model = create_model(name, 10, 32, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_(0, 0.5)
    return model


def ones_like_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in pu.prunable_weights(model).items()}


def checkpoint(model: nn.Module, arch: str, masks: dict, **kw) -> dict:
    """A state checkpoint with the keys main_imp_fillback.py writes (weights masked)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for n, m in masks.items():
        sd[f"{n}.weight"] *= m
    return {"arch": arch, "num_classes": 10, "img_size": 32, "state_dict": sd, "mask": masks, "model_kwargs": kw}


def vit_checkpoint() -> dict:
    """vit_tiny depth 2: block 0 keeps 1 of 3 heads, block 1 keeps 2 (one head dropped by v rows
    only: it outputs its v bias, folded into proj.bias); MLP neurons dropped by fc1 row and fc2
    column (block 0), by fc1 row only (block 1: constant GELU(b1) folded) or fc2 column only."""
    model = trained_like("vit_tiny", depth=2)
    masks = ones_like_masks(model)
    masks["blocks.0.attn.qkv"].view(3, 3, HD, -1)[:, 1:] = False
    masks["blocks.0.attn.proj"].view(-1, 3, HD)[:, 1:] = False
    masks["blocks.1.attn.qkv"].view(3, 3, HD, -1)[2, 0] = False
    masks["blocks.0.mlp.fc1"][::2] = False
    masks["blocks.0.mlp.fc2"][:, ::2] = False
    masks["blocks.1.mlp.fc1"][:100] = False
    masks["blocks.1.mlp.fc2"][:, 300:] = False
    return checkpoint(model, "vit_tiny", masks, depth=2)


def channel_checkpoint(arch: str = "res20s", **kw) -> dict:
    """Every prunable conv loses a third of its filters (whole output channels)."""
    kw = kw or ({"width": 4} if arch == "res20s" else {})
    model = trained_like(arch, **kw)
    masks = ones_like_masks(model)
    for m in masks.values():
        m[::3] = False
    return checkpoint(model, arch, masks, **kw)


def export_pair(ck: dict) -> tuple[nn.Module, nn.Module, dict]:
    masked = export.masked_model(ck)
    artifact = export.export_artifact(ck, masked)
    return masked, export.build_compact(artifact), artifact


def assert_equivalent(masked: nn.Module, compact: nn.Module, batch: int = 8) -> None:
    x = export.random_input(batch, 32, seed=1)
    assert export.max_abs_diff(masked, compact, x) <= export.TOLERANCE


# -------------------------------------------------------------------------------- ViT
def test_vit_heads_and_neurons_removed_and_outputs_match():
    masked, compact, artifact = export_pair(vit_checkpoint())
    desc = artifact["compact"]
    assert desc["num_heads"] == [1, 2]
    assert desc["mlp_hidden"] == [192, 384 - 100 - 84]
    for blk, heads in zip(compact.blocks, desc["num_heads"]):
        assert blk.attn.num_heads == heads
        assert blk.attn.attn_dim == heads * HD == blk.attn.proj.in_features
        assert blk.attn.qkv.out_features == 3 * heads * HD
    assert export.count_params(compact) < export.count_params(masked)
    assert_equivalent(masked, compact)


def test_vit_layer_left_with_one_head_matches_at_batch_one():
    masked, compact, _ = export_pair(vit_checkpoint())
    assert compact.blocks[0].attn.num_heads == 1
    assert_equivalent(masked, compact, batch=1)


def test_vit_all_heads_masked_keeps_one_unit():
    model = trained_like("vit_tiny", depth=2)
    masks = ones_like_masks(model)
    masks["blocks.1.attn.qkv"][:] = False
    masks["blocks.1.attn.proj"][:] = False
    masks["blocks.1.mlp.fc2"][:] = False
    masked, compact, artifact = export_pair(checkpoint(model, "vit_tiny", masks, depth=2))
    assert artifact["compact"]["num_heads"] == [3, 1]
    assert artifact["compact"]["mlp_hidden"] == [384, 1]
    assert_equivalent(masked, compact)


# -------------------------------------------------------------------------------- CNN
@pytest.mark.parametrize("arch, kw", [("res20s", {"width": 4}), ("vgg16_bn", {"width_div": 16})])
def test_channels_removed_with_folded_constants_match(arch, kw):
    masked, compact, artifact = export_pair(channel_checkpoint(arch, **kw))
    desc = artifact["compact"]
    assert desc["channels"] and desc["folded"]  # the constants matter: relu(bn(0)) > 0 somewhere
    assert export.count_params(compact) < export.count_params(masked)
    assert_equivalent(masked, compact)


def test_resnet_keeps_residual_stream_channels():
    masked, compact, artifact = export_pair(channel_checkpoint("res20s", width=4))
    assert all(name.endswith(".conv1") for name in artifact["compact"]["channels"])
    small = dict(compact.named_modules())
    for name, m in masked.named_modules():
        if isinstance(m, nn.Conv2d) and not name.endswith(".conv1"):
            assert small[name].out_channels == m.out_channels, name


def test_folding_is_needed_for_equivalence():
    """Dropping constant channels without their fold kernels changes the output."""
    masked, compact, _ = export_pair(channel_checkpoint("res20s", width=4))
    with torch.no_grad():
        for m in compact.modules():
            if isinstance(m, FoldedConv2d):
                m.fold_kernel.zero_()
    x = export.random_input(4, 32, seed=1)
    assert export.max_abs_diff(masked, compact, x) > export.TOLERANCE


@pytest.mark.parametrize("arch, kw", [("res20s", {"width": 4}), ("vit_tiny", {"depth": 2})])
def test_unstructured_mask_exports_same_size_and_matches(arch, kw):
    model = trained_like(arch, **kw)
    weights = pu.prunable_weights(model)
    ones = pu.ones_masks(model)
    imp = pu.global_magnitude_prune(weights, ones, pu.count_total(ones) // 2)
    masked, compact, _ = export_pair(checkpoint(model, arch, pu.masks_to_bool(imp), **kw))
    assert export.count_params(compact) == export.count_params(masked)
    assert_equivalent(masked, compact)


# ------------------------------------------------------------------------ file and CLI
RELOAD = """
import sys, torch
sys.path.insert(0, {root!r})
from export import load_compact
ref = torch.load({ref!r})
model = load_compact({path!r})
with torch.inference_mode():
    diff = (model(ref["x"]) - ref["y"]).abs().max().item()
print(type(model).__name__, diff)
sys.exit(0 if diff <= {tol!r} else 1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("make", [vit_checkpoint, channel_checkpoint], ids=["vit", "res20s"])
def test_reload_in_fresh_process_gives_same_outputs(tmp_path, make):
    ck = make()
    ck_path, out, ref = tmp_path / "1checkpoint.pth.tar", tmp_path / "compact.pt", tmp_path / "ref.pt"
    torch.save(ck, ck_path)
    assert (
        export.main(
            [
                "--checkpoint",
                str(ck_path),
                "--out",
                str(out),
                "--batch",
                "4",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    x = export.random_input(3, 32, seed=2)
    with torch.inference_mode():
        torch.save({"x": x, "y": export.masked_model(ck)(x)}, ref)
    code = RELOAD.format(root=ROOT, ref=str(ref), path=str(out), tol=export.TOLERANCE)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path / "missing.pth.tar"), "--out", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.pth.tar" in err and "Traceback" not in err
    torch.save({"state_dict": {}}, tmp_path / "init.pth.tar")
    assert export.main(["--checkpoint", str(tmp_path / "init.pth.tar"), "--out", "x.pt"]) == 2
    assert "not a state checkpoint" in capsys.readouterr().err


def test_cli_failed_equivalence_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    torch.save(channel_checkpoint(), tmp_path / "ck.pth.tar")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    out = tmp_path / "compact.pt"
    assert export.main(["--checkpoint", str(tmp_path / "ck.pth.tar"), "--out", str(out), "--batch", "2"]) == 1
    assert not out.exists() and "differs" in capsys.readouterr().err


@pytest.mark.slow
def test_export_of_a_real_run_checkpoint(refill_run, tmp_path, capsys):
    """End to end: a res20s channel run on synthetic data, exported from its state-1 checkpoint; --eval
    gives the masked model's test accuracy the run recorded, and the compact model's, equal to it."""
    save_dir = refill_run
    out = tmp_path / "compact.pt"
    assert (
        export.main(
            [
                "--checkpoint",
                os.path.join(save_dir, "1checkpoint.pth.tar"),
                "--out",
                str(out),
                "--batch",
                "4",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--eval",
            ]
        )
        == 0
    )
    ck = export.read_checkpoint(os.path.join(save_dir, "1checkpoint.pth.tar"))
    assert export.count_params(export.load_compact(str(out))) < export.count_params(export.masked_model(ck))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("test accuracy on synthetic"))
    masked, compact = (float(line.split(f"{m} ")[1].split(" %")[0]) for m in ("masked", "compact"))
    with open(os.path.join(save_dir, "summary.json")) as f:
        recorded = json.load(f)[1]["final_test_acc"]
    assert masked == compact == pytest.approx(recorded, abs=0.01) and line.endswith("differ: 0")


def test_eval_needs_the_runs_config(tmp_path, capsys):
    torch.save(channel_checkpoint(), tmp_path / "ck.pth.tar")
    assert export.main(["--checkpoint", str(tmp_path / "ck.pth.tar"), "--out", str(tmp_path / "c.pt"), "--eval"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run config" in err and not (tmp_path / "c.pt").exists()


def test_warns_when_a_checkpoint_is_denser_than_its_states_target(tmp_path):
    """A best-val file from before an RSST removal (older versions) is not the state's ticket."""
    ck = channel_checkpoint("res20s", width=4)
    target = {n: m.clone() for n, m in ck["mask"].items()}
    first = next(iter(target))
    target[first][: target[first].shape[0] // 2] = False
    state = dict(ck, masks={"target": target})
    torch.save(state, tmp_path / "1checkpoint.pth.tar")
    torch.save(ck, tmp_path / "1model_SA_best.pth.tar")
    assert "more than its state's structured target" in export.target_density_warning(
        ck, str(tmp_path / "1model_SA_best.pth.tar")
    )
    assert export.target_density_warning(state, str(tmp_path / "1checkpoint.pth.tar")) is not None
    assert export.target_density_warning(dict(ck, masks={"target": ck["mask"]}), "x.pth.tar") is None
