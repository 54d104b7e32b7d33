"""Image folders (--dataset folder / imagenet), timm ViTs (timm:NAME) and local pretrained weights
(--pretrained_file): generated JPEG trees and weight files in tmp dirs, no network."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import dataset as D
import export
import folder_data as FD
import loaders as L
import main_imp_fillback as mif
import pruning_utils as pu
from models import create_model
from models.weights import load_weight_file
from vit_pruning_utils import head_groups, neuron_groups

TIMM_NAME = "vit_tiny_patch16_224"  # the smallest timm VisionTransformer with patch 16
BASE = ["--device", "cpu", "--threads", "1", "--wandb", "disabled", "--workers", "0"]


def write_tree(root, splits: dict[str, int], classes: int, seed: int = 0) -> str:
    """root/<split>/class<k>/<i>.jpg: per-class colour templates plus noise, 64-96 px."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (classes, 3))
    for split, n in splits.items():
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c:02d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(64, 97, 2))
                img = colours[c] + rng.normal(0, 25, (h, w, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:02d}.jpg"))
    return str(root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("folder"), {"train": 12, "val": 4}, classes=10)


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    """timm's own vit_tiny_patch16_224 (1000 classes, 224 px, random weights) as .safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    path = str(tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def file_weights(path):
    from safetensors.torch import load_file

    return load_file(path)


# -------------------------------------------------------------------------------- data
def test_holdout_is_stratified_fixed_and_disjoint_from_test(tree):
    classes, train, val, test = FD.scan_folder("folder", tree)
    assert classes == [f"class{c:02d}" for c in range(10)]
    assert np.bincount(val.labels).tolist() == [2] * 10  # min(10, 12 // 5) per class
    assert np.bincount(train.labels).tolist() == [10] * 10 and len(test) == 40
    assert not set(train.paths.tolist()) & set(val.paths.tolist())
    assert all(train.path(i).startswith(os.path.join(tree, "train")) for i in range(len(train)))
    assert all(test.path(i).startswith(os.path.join(tree, "val")) for i in range(len(test)))
    again = FD.scan_folder("folder", tree)[2]
    assert np.array_equal(val.paths, again.paths)
    data = D.load_splits("folder", tree, strong=True, img_size=48)
    assert isinstance(data.train, D.FileImages) and data.train.files.paths.dtype.kind == "S"  # no images in memory
    x, y = data.val[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and data.num_classes == 10 and data.img_size == 48


def test_test_split_is_test_folder_when_present(tmp_path):
    root = write_tree(tmp_path, {"train": 5, "test": 2}, classes=3)
    _, train, val, test = FD.scan_folder("folder", root)
    assert len(val) == 3 and len(train) == 12 and len(test) == 6
    assert all(test.path(i).startswith(os.path.join(root, "test")) for i in range(len(test)))


def test_persistent_workers_follow_each_epochs_seed(tree):
    """A worker started in epoch 1 draws epoch 2's augmentation (shared epoch seed), the same
    as a worker-less loader: the per-sample randomness a resumed run relies on."""
    files = FD.scan_folder("folder", tree)[1].subset(range(16))
    runs = {}
    for workers in (0, 1):
        ds = D.FileImages(files, FD.folder_transforms(32, True, True))
        sampler = L.EpochSampler(len(ds))
        loader = L.make_loader(ds, 8, workers, sampler, persistent=True)
        assert loader.persistent_workers == (workers > 0)
        runs[workers] = []
        for seed in (5, 6):
            ds.epoch_seed = seed
            sampler.set_epoch(seed)
            runs[workers].append(torch.cat([x for x, _ in loader]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[0][1])


# ----------------------------------------------------------------------------- weights
def test_loaded_file_gives_timms_own_logits(weight_file):
    import timm

    ref = timm.create_model(
        TIMM_NAME, pretrained=True, img_size=64, pretrained_cfg_overlay=dict(file=weight_file)
    ).eval()  # timm's own loader, offline
    ours = create_model(f"timm:{TIMM_NAME}", 1000, 64).eval()
    notes = load_weight_file(ours, weight_file)
    assert notes == ["pos_embed resampled from 196 to 16 patches"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-6, rtol=0)


def test_another_class_count_reinitializes_the_classifier(weight_file):
    model = create_model(f"timm:{TIMM_NAME}", 10, 224)
    notes = load_weight_file(model, weight_file)
    assert notes == ["classifier 'head' re-initialized: the file has 1000 classes, the model 10"]
    sd = file_weights(weight_file)
    assert torch.equal(model.state_dict()["blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])


def test_recipe_for_pretrained_vits_is_fine_tuning_and_flags_override(weight_file, tmp_path):
    argv = [
        "--dataset",
        "folder",
        "--arch",
        f"timm:{TIMM_NAME}",
        "--pretrained_file",
        weight_file,
        "--save_dir",
        str(tmp_path / "r"),
        "--epochs",
        "10",
    ]
    args = mif.parse_args(argv)
    mif.validate(args)
    mif.resolve(args)
    assert (args.optimizer, args.lr, args.warmup, args.lr_schedule, args.mixup) == ("adamw", 1e-4, 1.0, "cosine", 0.0)
    args = mif.parse_args(argv + ["--lr", "3e-4", "--mixup", "0.2"])
    mif.resolve(args)
    assert (args.lr, args.mixup) == (3e-4, 0.2)
    scratch = mif.parse_args(["--arch", "vit_small_imagenet", "--save_dir", str(tmp_path / "s")])
    mif.resolve(scratch)
    assert scratch.lr == 1e-3


# ----------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_rsst_heads_and_mlp_from_a_pretrained_file_on_a_folder(capsys, tree, weight_file, tmp_path):
    d = str(tmp_path / "run")
    rc = mif.main(
        [
            "--dataset",
            "folder",
            "--data",
            tree,
            "--arch",
            f"timm:{TIMM_NAME}",
            "--img_size",
            "64",
            "--pretrained_file",
            weight_file,
            "--prune_type",
            "pt",
            "--struct",
            "rsst",
            "--vit_structured",
            "--vit_prune_target",
            "both",
            "--rate",
            "0.3",
            "--epochs",
            "1",
            "--pruning_times",
            "2",
            "--batch_size",
            "16",
            "--save_dir",
            d,
            *BASE,
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "classifier 'head' re-initialized: the file has 1000 classes, the model 10" in out
    model = create_model(f"timm:{TIMM_NAME}", 10, 64)
    groups = head_groups(model) + neuron_groups(model)
    ck = torch.load(os.path.join(d, "1checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    assert ck["arch"] == f"timm:{TIMM_NAME}" and ck["img_size"] == 64 and ck["config"]["lr"] == 1e-4
    hard = {n: m.float() for n, m in ck["mask"].items()}
    assert pu.units_all_or_nothing(groups, hard) and pu.density(hard) < 0.9
    assert pu.units_all_or_nothing(groups, {n: m.float() for n, m in ck["masks"]["target"].items()})
    # the rewind point is the file's weights: all but the new classifier, pos_embed resampled
    from timm.layers import resample_abs_pos_embed

    init = torch.load(os.path.join(d, "init.pth.tar"), map_location="cpu", weights_only=True)["state_dict"]
    sd = file_weights(weight_file)
    for k, v in init.items():
        if k == "pos_embed":
            assert torch.equal(v, resample_abs_pos_embed(sd[k], [4, 4], num_prefix_tokens=1))
        elif not k.startswith("head."):
            assert torch.equal(v, sd[k]), k
    assert init["head.weight"].shape == (10, 192)
    out = str(tmp_path / "compact.pt")  # export.py checks compact == masked itself (exit 1 otherwise)
    assert (
        export.main(
            [
                "--checkpoint",
                os.path.join(d, "1checkpoint.pth.tar"),
                "--out",
                out,
                "--device",
                "cpu",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--batch",
                "2",
            ]
        )
        == 0
    )
    compact = export.load_compact(out)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_imagenet_layout_runs_one_state(run_main, tmp_path):
    root = write_tree(tmp_path / "imagenet", {"train": 10, "val": 2}, classes=3)
    rc, d, err = run_main(
        "--dataset",
        "imagenet",
        "--data",
        root,
        "--arch",
        "res20s",
        "--img_size",
        "32",
        "--pruning_times",
        "1",
        "--epochs",
        "1",
        "--batch_size",
        "8",
        "--eval_batch_size",
        "4",
        *BASE,
        small=False,
    )
    assert rc == 0, err
    ck = torch.load(os.path.join(d, "0checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    assert ck["num_classes"] == 3 and ck["img_size"] == 32 and ck["config"]["eval_batch_size"] == 4


def _bad_trees(tmp_path, weight_file, other_weights):
    missing = str(tmp_path / "nowhere")
    empty = write_tree(tmp_path / "empty", {"train": 6, "val": 2}, classes=3)
    for f in os.listdir(os.path.join(empty, "train", "class01")):
        os.remove(os.path.join(empty, "train", "class01", f))
    mismatch = write_tree(tmp_path / "mismatch", {"train": 6, "val": 2}, classes=3)
    os.rename(os.path.join(mismatch, "val", "class02"), os.path.join(mismatch, "val", "class09"))
    good = write_tree(tmp_path / "good", {"train": 6, "val": 2}, classes=3)
    vit = ["--arch", f"timm:{TIMM_NAME}", "--img_size", "32"]
    return {
        "missing folder": (["--dataset", "folder", "--data", missing], "folder not found"),
        "empty class": (["--dataset", "folder", "--data", empty], "class01 holds no images"),
        "class mismatch": (["--dataset", "imagenet", "--data", mismatch], "missing: class02; extra: class09"),
        "weights of another arch": (
            ["--dataset", "folder", "--data", good, *vit, "--pretrained_file", other_weights],
            "first bad key 'cls_token'",
        ),
        "unknown timm model": (
            ["--dataset", "folder", "--data", missing, "--arch", "timm:no_such_model"],
            "timm:no_such_model",
        ),  # checked before the (missing) data
        "not a ViT": (
            ["--dataset", "folder", "--data", good, "--arch", "timm:resnet18"],
            "not a timm VisionTransformer",
        ),
        "img_size on cifar": (["--dataset", "cifar10", "--img_size", "64"], "--img_size"),
        "pretrained_file on a CNN": (["--arch", "res20s", "--pretrained_file", weight_file], "--pretrained_file"),
    }


BAD = [
    "missing folder",
    "empty class",
    "class mismatch",
    "weights of another arch",
    "unknown timm model",
    "not a ViT",
    "img_size on cifar",
    "pretrained_file on a CNN",
]


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """A ViT-Small (one block) state dict: another architecture than vit_tiny."""
    import timm

    path = str(tmp_path_factory.mktemp("other") / "vit_small.pth")
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, depth=1).state_dict(), path)
    return path


@pytest.mark.parametrize("case", BAD)
def test_bad_data_and_archs_exit_2_with_one_line(run_main, tmp_path, weight_file, other_weights, case):
    flags, needle = _bad_trees(tmp_path, weight_file, other_weights)[case]
    rc, d, err = run_main(*flags, "--epochs", "1", "--pruning_times", "1", *BASE, small=False)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not os.path.exists(os.path.join(d, "0checkpoint.pth.tar"))


# ------------------------------------------------------------------------------ models
@pytest.mark.parametrize(
    "name, depth, heads, embed",
    [("vit_small_imagenet", 12, 6, 384), ("vit_base_imagenet", 12, 12, 768), ("vit_large_imagenet", 24, 16, 1024)],
)
def test_imagenet_vits_have_timms_geometry_and_the_vit_surface(name, depth, heads, embed):
    import models

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name, 1000)
    layout = model.blocks_layout()
    assert models.is_vit(name) and models.is_vit(f"timm:{TIMM_NAME}")
    assert model.patch_embed.patch_size == (16, 16) and model.patch_embed.img_size == (224, 224)
    assert len(layout) == depth and {(b.num_heads, b.head_dim) for b in layout} == {(heads, embed // heads)}
    assert model.prunable_layers()[:4] == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]


def test_vit_pretrained_fits_hub_weights_without_the_hub(monkeypatch):
    """--vit_pretrained's path with timm's hub download replaced by a random model."""
    import timm

    from models.vit import load_imagenet_weights

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: real(name, **{**kw, "depth": 2}))
    model = create_model("vit_small_imagenet", 10, 64, depth=2)
    notes = load_imagenet_weights(model, "vit_small_imagenet")
    assert [n.split(":")[0] for n in notes] == [
        "classifier 'head' re-initialized",
        "pos_embed resampled from 196 to 16 patches",
    ]


# ------------------------------------------------------------------- unreadable images
def corrupt(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())


def test_an_unreadable_image_is_replaced_by_the_next_readable_one(tmp_path, capsys):
    root = write_tree(tmp_path, {"train": 10, "val": 2}, classes=2)
    corrupt(os.path.join(root, "val", "class00", "01.jpg"))  # test split: class00/00, 01, class01/00, 01
    data = D.load_splits("folder", root, strong=False, img_size=32)
    test = data.test
    assert torch.equal(test[1][0], test[2][0]) and test[1][1] == 1  # image 2 (class01) stands in for image 1
    assert test.files.unreadable.tolist() == [0, 1, 0, 0]
    assert torch.equal(test[1][0], test[2][0])
    err = capsys.readouterr().err
    assert err.count("warning: unreadable image") == 1 and "class00/01.jpg" in err  # once, named
    loader = L.make_loader(test, 3, 1)  # in a worker: the flag reaches this process
    test.files.unreadable.zero_()
    assert [len(y) for _, y in loader] == [3, 1] and test.files.unreadable.tolist() == [0, 1, 0, 0]


def test_folder_with_a_corrupt_png_trains_to_the_end(run_main, tmp_path):
    root = write_tree(tmp_path / "data", {"train": 10, "val": 2}, classes=3)
    corrupt(os.path.join(root, "train", "class01", "corrupt.png"))
    flags = ["--dataset", "folder", "--data", root, "--arch", "res20s", "--img_size", "32", "--batch_size", "8"]
    rc, d, err = run_main(*flags, "--pruning_times", "2", "--epochs", "1", *BASE, small=False)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning: unreadable image" in line]
    assert len(warnings) == 1 and "corrupt.png" in warnings[0], err
    rows = open(os.path.join(d, "summary.csv")).read().splitlines()
    col = rows[0].split(",").index("unreadable_images")
    assert [r.split(",")[col] for r in rows[1:]] == ["1", "1"]


def test_more_than_one_percent_unreadable_exits_2(run_main, tmp_path):
    root = write_tree(tmp_path / "data", {"train": 10, "val": 2}, classes=3)
    for c in (0, 2):
        corrupt(os.path.join(root, "val", f"class{c:02d}", "00.jpg"))  # 2 of the 6 test images
    flags = ["--dataset", "folder", "--data", root, "--arch", "res20s", "--img_size", "32", "--batch_size", "8"]
    rc, d, err = run_main(*flags, "--pruning_times", "1", "--epochs", "1", *BASE, small=False)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "2 of the 6 test images are unreadable" in errors[0], err
    assert "Traceback" not in err


@pytest.mark.slow
def test_mamba_imagenet_geometry_on_a_folder_regroups_and_rebuilds_from_its_checkpoint(run_main, tmp_path):
    """mamba_small_imagenet (patch 16, 2 blocks) on an image folder at 64 px: 2 states, inner channels and
    neurons regrouped; the checkpoint rebuilds the same model (depth, image size)."""
    root = write_tree(tmp_path / "folder", {"train": 12, "val": 2}, classes=3)
    flags = ["--dataset", "folder", "--data", root, "--arch", "mamba_small_imagenet", "--depth", "2"]
    flags += ["--img_size", "64", "--struct", "refill", "--rate", "0.3", "--pruning_times", "2", "--epochs", "1"]
    rc, d, err = run_main(*flags, "--batch_size", "8", "--eval_batch_size", "4", *BASE, small=False)
    assert rc == 0, err
    ck = torch.load(os.path.join(d, "1checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    assert ck["num_classes"] == 3 and ck["img_size"] == 64 and ck["model_kwargs"]["depth"] == 2
    model = create_model(ck["arch"], ck["num_classes"], ck["img_size"], **ck["model_kwargs"])
    model.load_state_dict(ck["state_dict"])
    hard = ck["masks"]["hard"]
    kept = {n: int(m.count_nonzero()) for n, m in hard.items() if n.endswith("mixer.out_proj")}
    assert kept and all(k < hard[n].numel() for n, k in kept.items())  # inner channels dropped in each block
