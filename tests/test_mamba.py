"""Vision Mamba: the selective scan against its reference, the models, the unit regroup, compaction."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import pruning_utils as pu
from compact import compact_state
from compact_mamba import resize_mamba
from mamba_pruning_utils import MAMBA_TARGETS, mamba_unit_groups
from models import create_model
from models.mamba import MambaMixer
from models.selective_scan import fused_available, selective_scan, selective_scan_ref
from rsst import norm_penalty

MIXER_PARAMS = {
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
}
BACKWARD_PARAMS = {"conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias"}
BACKWARD_PARAMS |= {"A_b_log", "D_b"}


def scan_inputs(b=2, d=6, n=4, L=64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    ins = [r(b, d, L), r(b, d, L), -(0.5 + 4 * torch.rand(d, n, generator=g)), r(b, n, L), r(b, n, L), r(d)]
    ins += [r(b, d, L), r(d)]  # z, delta_bias
    return [t.to(device).requires_grad_() for t in ins]


def run_scan(fn, ins, **kw):
    y = fn(*ins, delta_softplus=True, **kw)
    weight = torch.sin(torch.arange(y.numel(), dtype=torch.float32)).view_as(y).to(y.device)
    return y, torch.autograd.grad((y.float() * weight).sum(), ins)


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ---------------------------------------------------------------------------- scan
@pytest.mark.parametrize("kw", [{}, {"chunk": 5}, {"chunk": 64}, {"checkpoint": True}])
def test_chunked_scan_matches_reference_fp32(kw):
    ins = scan_inputs()
    y_ref, g_ref = run_scan(selective_scan_ref, ins)
    y, g = run_scan(selective_scan, ins, **kw)
    assert rel(y, y_ref) <= 1e-5
    for a, b in zip(g, g_ref):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_scan_matches_reference_without_splits(chunk):
    """Small dt (as at init): every chunk takes the two-cumsum path, none is split."""
    ins = scan_inputs()
    with torch.no_grad():
        ins[7].fill_(-4.0)  # dt ~ softplus(-4 + N(0, 1)) ~ 0.02
    y_ref, g_ref = run_scan(selective_scan_ref, ins)
    y, g = run_scan(selective_scan, ins, chunk=chunk)
    assert rel(y, y_ref) <= 1e-5
    for a, b in zip(g, g_ref):
        assert rel(a, b) <= 1e-5


def test_chunked_scan_is_stable_for_large_dt():
    """Chunks whose log decay spans more than LOG_SPAN are split: no overflow, still exact."""
    ins = scan_inputs()
    with torch.no_grad():
        ins[7].fill_(30.0)  # dt ~ 30 per token, |A| up to 4.5: a chunk sums to thousands
    y_ref, _ = run_scan(selective_scan_ref, ins)
    y, g = run_scan(selective_scan, ins)
    assert bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(t).all()) for t in g)
    assert rel(y, y_ref) <= 1e-5


def test_scan_under_bf16_autocast_is_close():
    """Inputs in bf16 (as autocast's Linear outputs are): the scan runs in fp32 and returns bf16;
    within 1e-2 of the fp32 reference on the same inputs (bf16 has 8 mantissa bits)."""
    ins = [t.detach().bfloat16() for t in scan_inputs()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(*ins, delta_softplus=True)
    y_ref = selective_scan_ref(*[t.float() for t in ins], delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert rel(y, y_ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not fused_available(), reason="needs the mamba_ssm package")
def test_fused_kernel_matches_reference():
    ins = scan_inputs(device="cuda")
    y_ref, g_ref = run_scan(selective_scan_ref, ins)
    y, g = run_scan(selective_scan, ins, fused=True)
    assert rel(y, y_ref) <= 1e-4
    for a, b in zip(g, g_ref):
        assert rel(a, b) <= 1e-3


# --------------------------------------------------------------------------- models
def test_mamba_tiny_has_12_blocks_with_mamba_ssm_names():
    model = create_model("mamba_tiny", 10, 32)
    assert len(model.blocks) == 12
    names = {n for n, _ in model.blocks[0].mixer.named_parameters()}
    assert names == MIXER_PARAMS | BACKWARD_PARAMS
    m = model.blocks[0].mixer
    assert (m.d_model, m.d_inner, m.d_state, m.dt_rank) == (96, 192, 8, 6)
    assert model.blocks[0].mlp.fc1.weight.shape == (384, 96)
    assert model.patch_embed.num_patches == 64


def test_single_direction_has_only_the_forward_scan():
    model = create_model("mamba_tiny", 10, 32, depth=1, direction="forward")
    assert {n for n, _ in model.blocks[0].mixer.named_parameters()} == MIXER_PARAMS


def test_mamba_init():
    m = MambaMixer(32, d_state=8)
    for a_log in (m.A_log, m.A_b_log):
        assert torch.allclose(a_log, torch.log(torch.arange(1.0, 9.0)).expand(64, 8))
    for dt_proj in (m.dt_proj, m.dt_proj_b):
        dt = F.softplus(dt_proj.bias.detach())
        assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    assert torch.equal(m.D, torch.ones(64))


def _mixer_change(direction: str, changed: int, seen: int) -> float:
    """Largest change of the mixer output at token `seen` when token `changed` moves (fp64, so
    that the small influence of a far token at init stands 1e6 above rounding)."""
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=4, direction=direction).double().eval()
    x = torch.randn(1, 64, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, changed] += 1.0
    with torch.no_grad():
        return float((m(x)[:, seen] - m(x2)[:, seen]).abs().max())


def test_token_0_reaches_token_63():
    """63 tokens apart: far past the 4-token convolution, so only the scan's state carries it."""
    assert _mixer_change("forward", 0, 63) > 1e-9
    assert _mixer_change("bidirectional", 0, 63) > 1e-9


def test_bidirectional_reaches_backwards_and_forward_is_causal():
    assert _mixer_change("bidirectional", 63, 0) > 1e-9
    assert _mixer_change("forward", 63, 0) == 0.0


def test_scan_carries_state_across_chunks():
    """A slow decay (dt A ~ -0.01 per token): token 0's input is still ~half of token 63's state."""
    b, d, n, L = 1, 2, 3, 64
    u, C = torch.zeros(b, d, L), torch.ones(b, n, L)
    u[..., 0] = 1.0
    delta, A, B = torch.full((b, d, L), 0.01), -torch.ones(d, n), torch.ones(b, n, L)
    y = selective_scan(u, delta, A, B, C, chunk=16)
    expected = n * 0.01 * math.exp(-0.01 * 63)
    assert torch.allclose(y[..., 63], torch.full((b, d), expected), rtol=1e-5)


@pytest.mark.parametrize("name", ["mamba_small_imagenet", "mamba_base_imagenet"])
def test_imagenet_geometries_use_patch_16_at_224(name):
    model = create_model(name, 5, depth=1)
    assert model.patch_embed.num_patches == 196
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)


# ---------------------------------------------------------------------------- units
def shallow(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("mamba_tiny", 7, 32, depth=2, **kw).eval()


def prune_and_regroup(model, criterion="magnitude", target="both", rate=0.5):
    """IMP mask at `rate`, regrouped; weights and the dropped units' extras zeroed."""
    weights, modules = pu.prunable_weights(model), dict(model.named_modules())
    groups = mamba_unit_groups(model, target)
    ones = pu.ones_masks(model)
    imp = pu.global_magnitude_prune(weights, ones, pu.imp_keep_count(pu.count_total(ones), rate, 1))
    stats = None
    if criterion in pu.ACTIVATION_CRITERIA:
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 7, (4,), generator=g))]
        stats = pu.collect_activation_stats(model, groups, batches, "cpu", criterion == "saliency")
    target_masks, reports = pu.regroup(groups, weights, imp, criterion, stats)
    pu.apply_masks(weights, target_masks)
    with torch.no_grad():
        for t, m in pu.dead_norm_masks(groups, modules, target_masks):
            t.mul_(m)
    return groups, target_masks, reports


def channel_params(model, block: int, c: int) -> list[torch.Tensor]:
    """Every parameter entry that belongs to inner channel c of `block`."""
    m = model.blocks[block].mixer
    d = m.d_inner
    out = [m.in_proj.weight[c], m.in_proj.weight[d + c], m.out_proj.weight[:, c]]
    for conv, x_proj, dt_proj, a_log, d_skip in m.scans():
        out += [getattr(m, conv).weight[c], getattr(m, conv).bias[c : c + 1], getattr(m, x_proj).weight[:, c]]
        out += [getattr(m, dt_proj).weight[c], getattr(m, dt_proj).bias[c : c + 1], getattr(m, a_log)[c]]
        out += [getattr(m, d_skip)[c : c + 1]]
    return out


@pytest.mark.parametrize("criterion", sorted(pu.CRITERIA))
def test_regroup_drops_whole_channels_and_neurons(criterion):
    model = shallow()
    groups, masks, reports = prune_and_regroup(model, criterion)
    assert pu.units_all_or_nothing(groups, masks)
    kinds = {r["kind"] for r in reports}
    assert kinds == {"inner channel", "neuron"}
    for r in reports:
        assert 0 < r["kept"] < r["num_units"], r["layer"]
    for blk, r in enumerate(r for r in reports if r["kind"] == "inner channel"):
        dropped = (~r["keep"]).nonzero().flatten().tolist()
        kept = r["keep"].nonzero().flatten().tolist()
        for c in dropped[:3]:
            assert all(not bool(t.any()) for t in channel_params(model, blk, c)), c  # fully dead
        assert all(bool(t.any()) for t in channel_params(model, blk, kept[0])[3:])  # extras of a kept one stay
    for blk, r in enumerate(r for r in reports if r["kind"] == "neuron"):
        j = int((~r["keep"]).nonzero()[0])
        mlp = model.blocks[blk].mlp
        assert not (mlp.fc1.weight[j].any() or mlp.fc1.bias[j] or mlp.fc2.weight[:, j].any())


@pytest.mark.parametrize("target", MAMBA_TARGETS)
def test_prune_target_selects_unit_kinds(target):
    kinds = {g.kind for g in mamba_unit_groups(shallow(), target)}
    assert kinds == {"ssm": {"inner channel"}, "mlp": {"neuron"}, "both": {"inner channel", "neuron"}}[target]


def test_unknown_prune_target_raises():
    with pytest.raises(ValueError):
        mamba_unit_groups(shallow(), "heads")


def test_rsst_penalty_covers_the_extras_of_dropped_channels():
    model = shallow()
    groups = mamba_unit_groups(model, "ssm")
    masks = pu.ones_masks(model)
    g = groups[0]
    penalty = {n: torch.zeros_like(m) for n, m in masks.items()}
    for mem in g.members:  # channel 3 under the penalty
        penalty[mem.name] = pu.expand_units(torch.arange(g.num_units) == 3, mem, masks[mem.name])
    pairs = norm_penalty(groups, dict(model.named_modules()), penalty)
    assert len(pairs) == len(g.extras)
    a_log = model.blocks[0].mixer.A_b_log
    (m,) = [m for t, m in pairs if t is a_log]
    assert m[3].all() and float(m.sum()) == a_log.shape[1]


# -------------------------------------------------------------------------- compact
@pytest.mark.parametrize("direction", ["bidirectional", "forward"])
def test_compact_model_equals_masked_model(direction):
    model = shallow(direction=direction)
    groups, masks, reports = prune_and_regroup(model, "l1")
    desc, sd = compact_state(model, masks)
    kept = [r["kept"] for r in reports]
    assert desc["d_inner"] + desc["mlp_hidden"] == kept
    small = create_model("mamba_tiny", 7, 32, depth=2, direction=direction)
    resize_mamba(small, desc)
    small.load_state_dict(sd)
    small.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel(small(x), model(x)) <= 1e-4
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())
    assert small.blocks[0].mixer.A_log.shape == (desc["d_inner"][0], 8)


def test_full_size_mamba_parameter_counts():
    n = sum(p.numel() for p in create_model("mamba_tiny", 10, 32).parameters())
    assert math.isclose(n, 1.769e6, rel_tol=0.01), n


# ------------------------------------------------------------------ end-to-end runs
def _load(save_dir, state):
    path = os.path.join(save_dir, f"{state}checkpoint.pth.tar")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("struct", ["refill", "rsst"])
def test_mamba_runs_drop_whole_channels_and_neurons(run_main, tmp_path, struct):
    """mamba_tiny (depth 2), 3 states at rate 0.3 on synthetic data: at state 2 whole inner
    channels (in_proj x and z rows, out_proj column, conv1d, A_log, D of both directions: all
    zero) and whole MLP neurons are dropped; the Refill ticket exports smaller and equal."""
    import export

    flags = ("--arch", "mamba_tiny", "--depth", "2", "--struct", struct, "--rate", "0.3", "--pruning_times", "3")
    rc, d, err = run_main(*flags, "--epochs", "1")
    assert rc == 0, err
    model = create_model("mamba_tiny", 10, 32, depth=2)
    groups = mamba_unit_groups(model, "both")
    previous = None
    for k in range(3):
        ck = _load(d, k)
        hard = {n: m.float() for n, m in ck["masks"]["hard"].items()}
        assert pu.units_all_or_nothing(groups, hard)
        if previous is not None:
            assert all(bool((hard[n] <= previous[n]).all()) for n in hard)
        previous = hard
    model.load_state_dict(ck["state_dict"])
    dropped = {"inner channel": 0, "neuron": 0}
    for g, kept in zip(groups, pu.units_kept(groups, hard)):
        dropped[g.kind] += g.num_units - kept
    assert dropped["inner channel"] > 0 and dropped["neuron"] > 0, dropped
    for blk, g in enumerate(g for g in groups if g.kind == "inner channel"):
        for c in (~pu.unit_alive(g, hard)).nonzero().flatten().tolist():
            assert all(not bool(t.any()) for t in channel_params(model, blk, c)), (blk, c)
    if struct == "refill":
        out = tmp_path / "compact.pt"
        argv = ["--checkpoint", os.path.join(d, "2checkpoint.pth.tar"), "--out", str(out), "--batch", "4"]
        assert export.main(argv + ["--warmup", "0", "--repeats", "1", "--device", "cpu"]) == 0
        compact_model = export.load_compact(str(out))
        masked = export.masked_model(export.read_checkpoint(os.path.join(d, "2checkpoint.pth.tar")))
        assert export.count_params(compact_model) < export.count_params(masked)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert rel(compact_model(x), masked(x)) <= 1e-4


def test_mamba_flags_need_their_arch(run_main):
    rc, _, err = run_main("--arch", "res20s", "--mamba_prune_target", "ssm")
    assert rc == 2 and "--mamba_prune_target ssm: needs a Mamba arch" in err
    rc, _, err = run_main("--arch", "res20s", "--depth", "2")
    assert rc == 2 and "--depth 2: needs a ViT or Mamba arch" in err
    rc, _, err = run_main("--arch", "vit_tiny", "--mamba_direction", "forward")
    assert rc == 2 and "--mamba_direction forward: needs a Mamba arch" in err


@pytest.mark.slow
def test_forward_only_mamba_run_keeps_its_direction_through_checkpoints_and_export(run_main, tmp_path):
    """--mamba_direction forward: a causal single-scan model (no backward parameters) is trained,
    regrouped, saved with its model keywords, and exported smaller and equal."""
    import export

    flags = ("--arch", "mamba_tiny", "--depth", "1", "--mamba_direction", "forward", "--struct", "refill")
    rc, d, err = run_main(*flags, "--rate", "0.3", "--pruning_times", "2", "--epochs", "1")
    assert rc == 0, err
    ck = _load(d, 1)
    assert ck["model_kwargs"] == {"depth": 1, "direction": "forward"}
    backward = {"conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b"}
    assert "blocks.0.mixer.A_log" in ck["state_dict"] and not [
        k for k in ck["state_dict"] if backward & set(k.split("."))
    ]
    out = tmp_path / "compact.pt"
    argv = ["--checkpoint", os.path.join(d, "1checkpoint.pth.tar"), "--out", str(out), "--batch", "4"]
    assert export.main(argv + ["--warmup", "0", "--repeats", "1", "--device", "cpu"]) == 0
    compact_model = export.load_compact(str(out))
    masked = export.masked_model(export.read_checkpoint(os.path.join(d, "1checkpoint.pth.tar")))
    assert masked.blocks[0].mixer.direction == compact_model.blocks[0].mixer.direction == "forward"
    assert export.count_params(compact_model) < export.count_params(masked)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(compact_model(x), masked(x)) <= 1e-4


@pytest.mark.slow
def test_mamba_run_resumes_exactly_after_sigterm(tmp_path):
    """RSST on mamba_tiny (depth 1): SIGTERM mid state 1, then --resume, equals the uninterrupted
    run (masks and weights, extras included: they live in the state dict)."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    flags = ["--arch", "mamba_tiny", "--depth", "1", "--struct", "rsst", "--rate", "0.3", "--pruning_times", "2"]
    flags += ["--epochs", "2", "--dataset", "synthetic", "--synthetic_size", "64", "--batch_size", "16"]
    flags += ["--device", "cpu", "--threads", "1", "--wandb", "disabled"]
    cmd = lambda d, *extra: [sys.executable, os.path.join(root, "main_imp_fillback.py"), *extra, "--save_dir", str(d)]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert subprocess.run(cmd(full, *flags), cwd=root, env=env, capture_output=True).returncode == 0
    p = subprocess.Popen(cmd(cut, *flags), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not os.path.exists(cut / "1model_SA_best.pth.tar") and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "run ended before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=300)
    assert p.returncode == 143
    resumed = subprocess.run(cmd(cut, "--resume"), cwd=root, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _load(full, 1), _load(cut, 1)
    for kind in ("hard", "imp", "target", "penalty"):
        assert all(torch.equal(a["masks"][kind][n], b["masks"][kind][n]) for n in a["masks"][kind])
    assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in a["state_dict"])


@pytest.mark.slow
def test_mamba_compact_training_equals_masked_training(run_main, tmp_path):
    """Refill state 1 trains the physically narrower Mamba (--compact_train auto): the same
    weights (<= 1e-4) and masks as masked dense training (off)."""
    flags = ("--arch", "mamba_tiny", "--depth", "1", "--struct", "refill", "--rate", "0.4", "--pruning_times", "2")
    cks = []
    for mode in ("auto", "off"):
        rc, d, err = run_main(*flags, "--epochs", "1", "--compact_train", mode, save_dir=tmp_path / mode)
        assert rc == 0, err
        cks.append(_load(d, 1))
        with open(os.path.join(d, "summary.json")) as f:
            ratio = json.load(f)[1]["train_mac_ratio"]
        assert (ratio < 0.9) if mode == "auto" else ratio == 1.0  # auto really trained the narrower model
    a, b = cks
    assert all(torch.equal(a["mask"][n], b["mask"][n]) for n in a["mask"])
    assert max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]) <= 1e-4


# ------------------------------------------------------------------ published weights
def vim_names(sd: dict) -> dict:
    """Our state dict under Vim's names (layers.N.mixer / layers.N.norm / norm_f, no MLPs), with a
    cls_token and a pos_embed holding its position in the middle (Vim's use_middle_cls_token)."""
    import re

    out = {}
    for k, v in sd.items():
        if ".mlp." in k or ".norm2." in k:
            continue
        k = re.sub(
            r"^blocks\.(\d+)\.(mixer|norm1)\.", lambda m: f"layers.{m[1]}.{'norm' if m[2] == 'norm1' else 'mixer'}.", k
        )
        out[re.sub(r"^norm\.", "norm_f.", k)] = v.clone()
    dim = sd["pos_embed"].shape[-1]
    out["cls_token"] = torch.randn(1, 1, dim)
    pos, mid = sd["pos_embed"], sd["pos_embed"].shape[1] // 2
    out["pos_embed"] = torch.cat([pos[:, :mid], torch.randn(1, 1, dim), pos[:, mid:]], 1)
    return out


@pytest.fixture(scope="module")
def mamba_source():
    torch.manual_seed(1)
    return create_model("mamba_tiny", 10, 32, depth=2).state_dict()


@pytest.fixture(scope="module")
def vim_file(tmp_path_factory, mamba_source):
    path = str(tmp_path_factory.mktemp("vim") / "vim.pth")
    torch.save({"model": vim_names(mamba_source)}, path)
    return path


def _load_into_fresh(path):
    from models.weights import load_pretrained

    model = create_model("mamba_tiny", 10, 32, depth=2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    return model.state_dict(), fresh, load_pretrained(model, "mamba_tiny", path)  # the CLI's loader


def test_vim_names_load_the_mixers_and_keep_the_mlp_init(vim_file, mamba_source):
    sd, fresh, notes = _load_into_fresh(vim_file)
    mixer = [k for k in sd if ".mixer." in k]
    assert len(mixer) == 2 * (len(MIXER_PARAMS) + len(BACKWARD_PARAMS))
    assert all(torch.equal(sd[k], mamba_source[k]) for k in mixer + ["blocks.1.norm1.weight", "norm.bias"])
    assert torch.equal(sd["pos_embed"], mamba_source["pos_embed"])  # the class-token position dropped
    mlp = [k for k in sd if ".mlp." in k or ".norm2." in k]
    assert mlp and all(torch.equal(sd[k], fresh[k]) for k in mlp)
    assert any(n.startswith(f"kept their initialization: {len(mlp)} tensors (e.g. blocks.0.norm2.") for n in notes)
    assert any(n.startswith("ignored, no place in the model: 1 tensors (e.g. cls_token)") for n in notes)
    assert "pos_embed: dropped class-token position(s) [32] (Vim's middle cls_token), the model has none" in notes


def test_mamba_ssm_backbone_names_load_and_our_own_file_loads_exactly(tmp_path, mamba_source):
    vim = vim_names(mamba_source)
    lm = {f"backbone.{k}": v for k, v in vim.items() if k.startswith(("layers.", "norm_f."))}
    lm |= {"backbone.embedding.weight": torch.randn(50, 96), "lm_head.weight": torch.randn(50, 96)}
    path = str(tmp_path / "lm.pth")
    torch.save(lm, path)
    sd, fresh, notes = _load_into_fresh(path)
    assert all(torch.equal(sd[k], mamba_source[k]) for k in sd if ".mixer." in k)
    assert torch.equal(sd["pos_embed"], fresh["pos_embed"]) and torch.equal(sd["head.weight"], fresh["head.weight"])
    assert any("ignored, no place in the model: 2 tensors (e.g. embedding.weight, lm_head.weight)" in n for n in notes)
    own = str(tmp_path / "own.pth")
    torch.save(mamba_source, own)
    sd, _, notes = _load_into_fresh(own)
    assert notes == [] and all(torch.equal(sd[k], mamba_source[k]) for k in sd)


def test_mamba_weights_that_do_not_fit_raise_one_line(tmp_path, mamba_source):
    from models.weights import load_pretrained

    other = vim_names(create_model("mamba_tiny", 10, 32, depth=2, d_state=16).state_dict())
    torch.save({"model": other}, tmp_path / "d16.pth")
    half = {k: v for k, v in vim_names(mamba_source).items() if k != "layers.1.mixer.conv1d_b.weight"}
    torch.save({"model": half}, tmp_path / "half.pth")
    torch.save(create_model("vit_tiny", 10, 32, depth=1).state_dict(), tmp_path / "vit.pth")
    for name, needle in [
        ("d16", "first bad key 'blocks.0.mixer.A_log': shape [192, 16] in the file, [192, 8] in the model"),
        ("half", "first bad key 'blocks.1.mixer.conv1d_b.weight': missing from the file"),
        ("vit", "not Mamba weights"),
    ]:
        with pytest.raises(ValueError) as e:
            load_pretrained(create_model("mamba_tiny", 10, 32, depth=2), "mamba_tiny", str(tmp_path / f"{name}.pth"))
        assert needle in str(e.value) and "\n" not in str(e.value), name


def test_pos_embed_loses_its_class_positions_and_is_resampled(tmp_path):
    big = vim_names(create_model("mamba_tiny", 10, 64, depth=2).state_dict())  # 16 x 16 patches + 1
    torch.save({"model": big}, tmp_path / "big.pth")
    sd, _, notes = _load_into_fresh(str(tmp_path / "big.pth"))
    assert sd["pos_embed"].shape == (1, 64, 96)
    assert "pos_embed resampled from 256 to 64 patches" in notes
    assert any("position(s) [128] (Vim's middle cls_token)" in n for n in notes)
    source = create_model("mamba_tiny", 10, 32, depth=2).state_dict()
    lead = vim_names(source)
    del lead["cls_token"]
    lead["pos_embed"] = torch.cat([torch.randn(1, 1, 96), source["pos_embed"]], 1)  # no cls_token: leading
    torch.save({"model": lead}, tmp_path / "lead.pth")
    sd, _, notes = _load_into_fresh(str(tmp_path / "lead.pth"))
    assert torch.equal(sd["pos_embed"], source["pos_embed"]) and any("[0] (leading)" in n for n in notes)


def test_pretrained_file_runs_a_mamba_arch_and_refuses_a_cnn(run_main, vim_file, mamba_source):
    flags = ("--arch", "mamba_tiny", "--depth", "2", "--pretrained_file", vim_file, "--prune_type", "pt")
    small = ("--synthetic_size", "32", "--batch_size", "16", "--pruning_times", "1", "--epochs", "1", "--threads", "1")
    rc, d, err = run_main(*flags, *small)
    assert rc == 0, err
    init = torch.load(os.path.join(d, "init.pth.tar"), map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(init["blocks.1.mixer.x_proj_b.weight"], mamba_source["blocks.1.mixer.x_proj_b.weight"])
    rc, _, err = run_main("--arch", "res20s", "--pretrained_file", vim_file)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"--pretrained_file {vim_file}: needs a ViT or Mamba arch" in err
