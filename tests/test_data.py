"""Data: splits, seeded per-sample augmentation, the epoch sampler, the GPU-resident batch
loader's augmentation (run here on CPU tensors)."""

import pytest
import torch

import dataset as D
import loaders as L


def test_digits_is_a_fixed_stratified_split_of_32x32_rgb():
    s = D.load_splits("digits", "unused", strong=False)
    sizes = [len(s.train), len(s.val), len(s.test)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == 360
    assert s.train.images.shape[1:] == (3, 32, 32) and s.train.images.dtype == torch.uint8
    for part in (s.train, s.val, s.test):
        counts = torch.bincount(part.labels, minlength=10).float()
        assert counts.min() / counts.max() > 0.9  # every class in every split, in proportion
    again = D.load_splits("digits", "unused", strong=False)
    assert torch.equal(s.test.labels, again.test.labels) and torch.equal(s.test.images, again.test.images)


def test_per_sample_augmentation_depends_only_on_epoch_seed_and_index():
    s = D.load_splits("digits", "unused", strong=True)
    s.train.epoch_seed = 5
    a = s.train[3][0]
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(a, s.train[3][0])
    s.train.epoch_seed = 6
    assert not torch.equal(a, s.train[3][0])


def test_epoch_sampler_shards_and_resumes():
    shards = [list(L.EpochSampler(103, r, 3).__iter__()) for r in range(3)]
    for sampler_shard in shards:
        assert len(sampler_shard) == 103 // 3
    flat = sum(shards, [])
    assert len(set(flat)) == len(flat)  # disjoint
    full = L.EpochSampler(50)
    full.set_epoch(7)
    tail = L.EpochSampler(50)
    tail.set_epoch(7, start=20)
    assert list(full)[20:] == list(tail) and len(tail) == 30


def crop_flip_batch(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """The loader's crop and flip of one batch, with its parameters drawn from `g` as the loader draws them."""
    params = L.crop_flip_params(len(x), pad, flip, g)
    return L.crop_flip(x, pad, *(None if p is None else p.to(x.device) for p in params))


def test_crop_flip_batch_takes_windows_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    y = crop_flip_batch(x, 2, True, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(6):
        windows = [padded[b, :, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        windows += [w.flip(2) for w in windows]
        assert any(torch.equal(y[b], w) for w in windows)
    same = crop_flip_batch(x, 2, True, torch.Generator().manual_seed(1))
    assert torch.equal(y, same)
    assert torch.equal(crop_flip_batch(x, 0, False, torch.Generator()), x)


def test_crop_flip_batch_varies_per_image():
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(32, 3, 1, 1)
    y = crop_flip_batch(x, 2, True, torch.Generator().manual_seed(0))
    assert len({tuple(img.flatten().tolist()) for img in y}) > 8


def _loader(start=0, trivial=False):
    images = torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = D.ImageTensors(images, torch.arange(40), transform=None)
    ds.epoch_seed = 3
    sampler = L.EpochSampler(40)
    sampler.set_epoch(3, start)
    aug = D.Augment(32, 4, True, trivial, (0.5,) * 3, (0.25,) * 3)
    return L.DeviceLoader(ds, aug, 8, torch.device("cpu"), sampler)


def test_device_loader_covers_the_epoch_once_and_normalizes():
    batches = list(_loader())
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(40))
    x = batches[0][0]
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
    assert x.min() >= (0 - 127.5) / 63.75 - 1e-5 and x.max() <= (255 - 127.5) / 63.75 + 1e-5


def test_device_loader_resumed_mid_epoch_gives_the_same_remaining_batches():
    for trivial in (False, True):
        torch.manual_seed(0)
        full = list(_loader(trivial=trivial))
        torch.manual_seed(0)
        resumed = list(_loader(start=16, trivial=trivial))
        if not trivial:  # crop/flip are seeded per batch; TrivialAugment draws from the global RNG
            assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], resumed))
        assert all(torch.equal(a[1], b[1]) for a, b in zip(full[2:], resumed))


def _reference_batches(loader):
    """The batches of the per-batch loader before epoch plans (each batch's indices and crop/flip
    parameters drawn and copied at its step): the epoch plan must give the same bits."""
    order = torch.tensor(list(loader.sampler))
    start = loader.sampler.start // loader.batch_size
    for b in range(len(loader)):
        idx = order[b * loader.batch_size : (b + 1) * loader.batch_size]
        seed = (loader.ds.epoch_seed * 1_000_003 + start + b + loader.rank * 0x9E3779B97F4A7C15) % (2**63)
        x = crop_flip_batch(loader.images[idx], loader.aug.pad, loader.aug.flip, torch.Generator().manual_seed(seed))
        if loader.trivial is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                x = torch.cat([loader.trivial(part) for part in x.split(loader.trivial_group)])
        yield (x.float() - loader.mean) / loader.std, loader.labels[idx]


@pytest.mark.parametrize("trivial", [False, True])
@pytest.mark.parametrize("pad, flip", [(4, True), (0, True), (4, False)])
def test_epoch_plan_batches_are_bit_identical_to_per_batch_draws(trivial, pad, flip):
    images = torch.randint(0, 255, (43, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ds = D.ImageTensors(images, torch.arange(43), transform=None)
    ds.epoch_seed = 11
    aug = D.Augment(16, pad, flip, trivial, (0.5,) * 3, (0.25,) * 3)
    for start, rank, drop_last in ((0, 0, False), (8, 1, False), (0, 1, True)):
        sampler = L.EpochSampler(43, rank, 2)
        sampler.set_epoch(11, start)
        loader = L.DeviceLoader(ds, aug, 4, torch.device("cpu"), sampler, drop_last, rank=rank)
        new, old = list(loader), list(_reference_batches(loader))
        assert len(new) == len(old) == len(loader) and len(new[-1][1]) == (4 if drop_last else (21 - start) % 4 or 4)
        for (x, y), (rx, ry) in zip(new, old):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    plan = loader.epoch_plan()
    assert plan.shape == (4, len(loader) * 4) and plan.dtype == torch.int64


@pytest.mark.gpu
def test_gpu_epoch_needs_no_host_sync_per_step():
    """A few training steps of batched GPU data under sync debug mode "error": a step that waits on
    the host (a blocking copy, .item(), a CPU-indexed gather) raises."""
    dev = torch.device("cuda")
    images = torch.randint(0, 255, (512, 3, 32, 32), dtype=torch.uint8)
    ds = D.ImageTensors(images, torch.arange(512) % 10, transform=None)
    ds.epoch_seed = 5
    sampler = L.EpochSampler(512)
    sampler.set_epoch(5)
    loader = L.DeviceLoader(ds, D.augment_for("cifar10", False, True), 64, dev, sampler, True)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10)).to(dev)
    model(torch.zeros(1, 3, 32, 32, device=dev))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    it = iter(loader)
    step(*next(it))  # the epoch plan (once per epoch) and the optimizer's state: before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(x, y) for x, y in it]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(losses) == 7 and all(torch.isfinite(v) for v in losses)
