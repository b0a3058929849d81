"""DeviceLoader: exact epochs, exact normalisation, reproducible augmentation, disjoint shards."""

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from normkd.data import Augment, DeviceLoader
from normkd.errors import DataError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)


def _data(n: int = 50, size: int = 8, low: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randint(low, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, 10, (n,), generator=g)


def _loader(x, y, batch_size=8, **kw) -> DeviceLoader:
    opts = dict(mean=MEAN, std=STD, shuffle=True, drop_last=False, augment=Augment(pad=2))
    opts.update(kw)
    return DeviceLoader(x, y, batch_size, **opts)


def _epoch(loader: DeviceLoader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_every_index_once_per_epoch() -> None:
    x, y = _data(50)
    loader = _loader(x, y)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 7 and loader.num_samples == 50
    assert [len(b[2]) for b in batches] == [8] * 6 + [2]
    idx = torch.cat([b[2] for b in batches])
    assert idx.dtype == torch.int64
    assert torch.equal(idx.sort().values, torch.arange(50))
    assert not torch.equal(idx, torch.arange(50))  # shuffled
    for xb, yb, ib in batches:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 8, 8)
        assert torch.equal(yb, y[ib])


def test_batches_are_normalised_with_mean_and_std() -> None:
    x, y = _data(20)
    loader = _loader(x, y, batch_size=6, augment=None, shuffle=False)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    seen = 0
    for xb, yb, ib in loader:
        assert torch.equal(yb, y[ib])
        assert torch.equal(ib, torch.arange(seen, seen + len(ib)))
        expected = (x[ib].float() / 255 - mean) / std
        torch.testing.assert_close(xb, expected, rtol=1e-6, atol=1e-6)
        seen += len(ib)
    assert seen == 20


def test_drop_last_drops_the_partial_batch() -> None:
    x, y = _data(50)
    loader = _loader(x, y, drop_last=True)
    batches = _epoch(loader)
    assert len(loader) == len(batches) == 6
    assert all(len(b[2]) == 8 for b in batches)
    assert len(set(torch.cat([b[2] for b in batches]).tolist())) == 48


def test_set_epoch_is_reproducible_and_epochs_differ() -> None:
    x, y = _data(40)
    loader = _loader(x, y)
    loader.set_epoch(3)
    first = _epoch(loader)
    loader.set_epoch(5)
    other = _epoch(loader)
    # a fresh loader (a resumed run) reproduces epoch 3 bit for bit
    resumed = _loader(x, y)
    resumed.set_epoch(3)
    again = _epoch(resumed)
    for a, b in zip(first, again, strict=True):
        for ta, tb in zip(a, b, strict=True):
            assert torch.equal(ta, tb)
    assert not torch.equal(torch.cat([b[2] for b in first]), torch.cat([b[2] for b in other]))
    # without set_epoch, epoch 0 is used every time
    fresh = _loader(x, y)
    assert torch.equal(_epoch(fresh)[0][0], _epoch(fresh)[0][0])
    fresh.set_epoch(0)
    assert torch.equal(_epoch(fresh)[0][0], _epoch(_loader(x, y))[0][0])


def _reference(img: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    """Crop of one zero-padded image by explicit slicing, then an optional mirror."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    padded[:, pad : pad + h, pad : pad + w] = img
    crop = padded[:, dy : dy + h, dx : dx + w]
    return crop.flip(-1) if flip else crop


def test_crop_and_flip_match_a_per_sample_reference() -> None:
    x, y = _data(30)
    loader = _loader(x, y, batch_size=7, augment=Augment(pad=3, flip=True))
    loader.set_epoch(2)
    plan = loader.plan()
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    out = torch.cat([b[0] for b in loader])
    assert torch.equal(torch.cat([b[2] for b in loader]), plan.idx)
    assert 0 < int(plan.flip.sum()) < 30 and len(set(plan.dx.tolist())) > 1
    assert int(plan.dy.min()) >= 0 and int(plan.dy.max()) <= 6
    for k in range(30):
        ref = _reference(x[plan.idx[k]], int(plan.dy[k]), int(plan.dx[k]), bool(plan.flip[k]), 3)
        torch.testing.assert_close(out[k], (ref.float() / 255 - mean) / std, rtol=1e-6, atol=1e-6)


def _explain(out: torch.Tensor, img: torch.Tensor, pad: int) -> set[tuple[int, int, bool]]:
    """Every (shift y, shift x, flip) under which out is img shifted with zero fill."""
    found = set()
    for flip in (False, True):
        for sy in range(-pad, pad + 1):
            for sx in range(-pad, pad + 1):
                if torch.equal(out, _reference(img, sy + pad, sx + pad, flip, pad)):
                    found.add((sy, sx, flip))
    return found


@pytest.mark.parametrize("flip", [True, False])
def test_augmented_pixels_are_a_consistent_shift_of_the_input(flip: bool) -> None:
    # Pixels >= 1 so zero padding is told apart from image content; mean 0, std 1 recovers x/255.
    x, y = _data(40, low=1)
    pad = 2
    loader = DeviceLoader(
        x, y, 10, mean=(0.0,) * 3, std=(1.0,) * 3, shuffle=True, drop_last=False,
        augment=Augment(pad=pad, flip=flip), seed=7,
    )  # fmt: skip
    shifts, flips = set(), 0
    for xb, _, ib in loader:
        back = (xb * 255).round().to(torch.uint8)
        for out, i in zip(back, ib):
            found = _explain(out, x[i], pad)
            assert len(found) == 1, f"sample {int(i)} is not one shift of its input: {found}"
            (sy, sx, f) = found.pop()
            shifts.add((sy, sx))
            flips += f
    assert len(shifts) > 5  # offsets vary per sample
    assert (0 < flips < 40) if flip else flips == 0


def test_no_augmentation_when_pad_zero_and_no_flip() -> None:
    x, y = _data(16)
    plain = _loader(x, y, augment=None, seed=4)
    noop = _loader(x, y, augment=Augment(pad=0, flip=False), seed=4)
    for a, b in zip(plain, noop, strict=True):
        assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0])


@pytest.mark.parametrize(("n", "drop_last"), [(50, False), (51, False), (51, True), (3, False)])
def test_two_ranks_see_disjoint_shards_covering_the_set(n: int, drop_last: bool) -> None:
    x, y = _data(n)
    ranks = [_loader(x, y, batch_size=4, rank=r, world_size=2, drop_last=drop_last) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    idx = [torch.cat([b[2] for b in r]) for r in ranks]
    assert len(ranks[0]) == len(ranks[1])
    assert len(idx[0]) == len(idx[1]) == ranks[0].num_samples
    union = set(idx[0].tolist()) | set(idx[1].tolist())
    if drop_last:
        assert set(idx[0].tolist()).isdisjoint(idx[1].tolist())
        assert len(union) == 2 * len(ranks[0]) * 4  # 25 per rank, 6 full batches of 4
    else:
        assert union == set(range(n))
        assert len(idx[0]) + len(idx[1]) == 2 * -(-n // 2)  # padded by wrapping
        if n % 2 == 0:
            assert set(idx[0].tolist()).isdisjoint(idx[1].tolist())


@pytest.mark.parametrize("drop_last", [False, True])
def test_unshuffled_shards_match_distributed_sampler(drop_last: bool) -> None:
    x, y = _data(23)
    for rank in (0, 1, 2):
        loader = _loader(
            x, y, batch_size=4, shuffle=False, rank=rank, world_size=3, drop_last=drop_last
        )
        sampler = DistributedSampler(
            range(23), num_replicas=3, rank=rank, shuffle=False, drop_last=drop_last
        )
        assert loader.plan().idx.tolist() == list(sampler)
        assert loader.shard_size == sampler.num_samples
        seen = torch.cat([b[2] for b in loader]).tolist()
        assert seen == list(sampler)[: len(loader) * 4]


def test_channels_last_output() -> None:
    x, y = _data(16)
    a = _epoch(_loader(x, y, channels_last=True))
    b = _epoch(_loader(x, y))
    assert a[0][0].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_bad_inputs_are_data_errors() -> None:
    x, y = _data(10)
    with pytest.raises(DataError, match="uint8"):
        _loader(x.float(), y)
    with pytest.raises(DataError, match="no batches"):
        _loader(x, y, batch_size=11, drop_last=True)
    with pytest.raises(DataError, match="rank"):
        _loader(x, y, rank=2, world_size=2)
    with pytest.raises(DataError, match="mean/std"):
        _loader(x, y, mean=(0.5,), std=(0.2,))
    with pytest.raises(DataError, match="pad"):
        Augment(pad=-1)
