"""A recipe's data section -> loaders: each kind gets its own augmentation, as the references do.

Checked on what comes out of the loaders: every augmented training image is the plain image
shifted by at most ``pad`` pixels (zero fill), mirrored only where flips are on.
"""

import torch

from normkd.config import recipe_from_dict
from normkd.data import CIFAR100_MEAN, CIFAR100_STD
from normkd.data.build import Data
from support import recipe_data, write_cifar100


def _recipe(kind: str, augment: bool, root=None) -> object:
    data = {"kind": kind, "augment": augment, "batch_size": 64, "n_train": 300}
    if root is not None:
        data["root"] = str(root)
    return recipe_from_dict(
        {"name": "d", "task": "train", "student": {"model": "resnet8"}, "data": data}
    )


def _first_batches(kind: str, root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch with and without augmentation (same order: same seed, epoch)."""
    plain: Data = recipe_data(_recipe(kind, False, root))
    aug: Data = recipe_data(_recipe(kind, True, root))
    (xp, _yp, ip), (xa, _ya, ia) = next(iter(plain.train)), next(iter(aug.train))
    assert torch.equal(ip, ia)
    return xp, xa


def _explain(
    plain: torch.Tensor, aug: torch.Tensor, pad: int, fill: torch.Tensor
) -> set[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) that turns ``plain`` into ``aug`` (one image). ``fill``: the
    normalised value of a black pixel, (0 - mean) / std per channel: what zero padding becomes."""
    found = set()
    for flipped in (False, True):
        src = plain.flip(-1) if flipped else plain
        padded = torch.nn.functional.pad(src - fill, (pad, pad, pad, pad)) + fill
        h, w = plain.shape[-2:]
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if torch.allclose(padded[:, dy : dy + h, dx : dx + w], aug, atol=1e-5):
                    found.add((dy - pad, dx - pad, flipped))
    return found


def test_digits_shift_by_one_pixel_and_never_mirror():
    xp, xa = _first_batches("digits")
    assert not torch.equal(xp, xa)
    flips = 0
    for p, a in zip(xp, xa):
        ways = _explain(p, a, 1, p.amin(dim=(1, 2), keepdim=True))  # digits have black pixels
        assert ways, "an augmented digit is not a shift of at most 1 pixel of the original"
        flips += all(flipped for _dy, _dx, flipped in ways)
    assert flips == 0  # a mirrored 2 is no 2


def test_cifar_shifts_by_up_to_four_pixels_and_mirrors_about_half(tmp_path):
    root = write_cifar100(tmp_path, n_train=128, n_test=16)
    xp, xa = _first_batches("cifar100", root)
    mean, std = torch.tensor(CIFAR100_MEAN), torch.tensor(CIFAR100_STD)
    fill = (-mean / std).view(3, 1, 1)
    far = flips = 0
    for p, a in zip(xp, xa):
        ways = _explain(p, a, 4, fill)
        assert ways, "an augmented CIFAR image is not a (mirrored) shift of at most 4 pixels"
        far += all(max(abs(dy), abs(dx)) > 1 for dy, dx, _f in ways)
        flips += all(flipped for _dy, _dx, flipped in ways)
    assert far > 0 and 10 < flips < 54  # of 64: shifts beyond 1 pixel, and flips


def test_a_plain_train_pass_reads_every_training_image_in_order_unaugmented(tmp_path):
    """``plain_train`` (WKD-L's class costs): the training split read as the test split is,
    whatever the recipe's augmentation, ``eval_batch_size`` at a time."""
    from normkd.data import load_cifar100
    from normkd.data.build import Place, build_data

    root = write_cifar100(tmp_path, n_train=100, n_test=16)
    recipe = _recipe("cifar100", True, root)
    data = build_data(recipe.data, Place(torch.device("cpu")), plain_train=True)
    x, y, idx = (torch.cat(parts) for parts in zip(*data.train))
    split = load_cifar100(root)
    assert len(data.train) == -(-100 // recipe.data.eval_batch_size)
    assert torch.equal(idx, torch.arange(100)) and torch.equal(y, split.y_train)
    mean, std = torch.tensor(split.mean).view(3, 1, 1), torch.tensor(split.std).view(3, 1, 1)
    torch.testing.assert_close(x, (split.x_train / 255 - mean) / std, rtol=0, atol=1e-6)
