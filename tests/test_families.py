"""The family registry: every arch has one family, its unit groups cover the prunable weights,
and compacting an all-ones mask gives back the model."""

import argparse

import pytest
import torch

import families
import pruning_utils as pu
from families import CNN, VIT, family_named, family_of, family_of_model
from models import MODEL_NAMES, create_model

SMALL = {"vit": {"depth": 2}, "mamba": {"depth": 2}}  # ViT-Tiny width at depth 2: fast
ARGS = argparse.Namespace(unstructured=False, vit_structured=True, vit_prune_target="both")


def _model(arch: str):
    torch.manual_seed(0)
    return create_model(arch, 10, 32, **SMALL.get(family_of(arch).name, {}))


@pytest.mark.parametrize("arch", MODEL_NAMES + ["timm:vit_tiny_patch16_224"])
def test_every_arch_has_exactly_one_family(arch):
    registered = families.families()  # FAMILIES plus the families of FAMILY_MODULES (Mamba)
    assert sum(f.matches(arch) for f in registered) == 1
    assert family_of(arch) in registered


def test_families_named_and_unknown_arch():
    assert family_of("vit_tiny") is VIT and family_of("res20s") is CNN and family_of("timm:deit_tiny") is VIT
    assert family_named("cnn") is CNN
    with pytest.raises(ValueError):
        family_of("not_a_model")
    assert VIT.regroups(ARGS) and not VIT.regroups(argparse.Namespace(unstructured=False, vit_structured=False))
    assert CNN.regroups(argparse.Namespace(unstructured=False)) and not CNN.regroups(ARGS.__class__(unstructured=True))


def test_register_adds_a_family_once(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", families.FAMILIES)
    extra = families.Family(**{**VIT.__dict__, "name": "extra", "matches": lambda a: a == "extra_arch"})
    families.register(extra)
    families.register(extra)
    names = [f.name for f in families.FAMILIES]
    assert names[:2] == ["vit", "cnn"] and names[-1] == "extra" and names.count("extra") == 1
    assert family_of("extra_arch") is extra


@pytest.mark.parametrize("arch", ["vit_tiny", "res20s", "vgg16_bn", "mamba_tiny"])
def test_unit_groups_cover_the_prunable_weights(arch):
    model = _model(arch)
    fam = family_of_model(model)
    assert fam is family_of(arch)
    weights = pu.prunable_weights(model)
    groups = fam.unit_groups(model, ARGS)
    covered = set()
    for g in groups:
        for m in g.members:
            assert m.name in weights and torch.Size(m.shape).numel() == weights[m.name].numel()
            assert pu.unit_view(weights[m.name], m).shape[0] == g.num_units
            covered.add(m.name)
    expected = {
        n for n, w in weights.items() if fam is not CNN or w.dim() == 4
    }  # CNN: the classifier stays unstructured
    assert covered == expected
    kinds = fam.unit_kinds(model)
    assert {m.name for gs in kinds.values() for g in gs for m in g.members} == expected


@pytest.mark.parametrize("arch", ["vit_tiny", "res20s", "vgg16_bn", "mamba_tiny"])
def test_compact_of_all_ones_is_the_model(arch):
    model = _model(arch).eval()
    fam = family_of(arch)
    small = fam.compact(model, pu.ones_masks(model)).eval()
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(small(x), model(x))


def test_compact_of_dropped_units_is_smaller_and_equal():
    model = _model("vit_tiny").eval()
    masks = pu.ones_masks(model)
    lay = model.blocks_layout()[0]
    hd = lay.head_dim
    masks[lay.proj][:, :hd] = False  # head 0 silent
    masks[lay.fc2][:, :5] = False  # neurons 0-4 silent
    with torch.no_grad():
        pu.apply_masks(pu.prunable_weights(model), masks)
    small = VIT.compact(model, masks).eval()
    assert small.blocks[0].attn.num_heads == lay.num_heads - 1
    assert small.blocks[0].mlp.fc1.out_features == model.blocks[0].mlp.fc1.out_features - 5
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() < 1e-5
