"""``--dry-run`` builds the real data as the run would, so it fails where the run would fail;
random images stand in only when asked for with ``--fake-data``."""

import pytest

from normkd.cli import main
from support import DEMO, sets

TEACHER = str(DEMO / "teacher.yaml")
FAST = ("student.model=resnet8", "engine.device=cpu", "data.batch_size=4", "data.workers=0")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["train", TEACHER, *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err.strip()


def _empty_class(tmp_path, write_images):
    root = write_images(tmp_path / "images", classes=2, per_class=4)
    (root / "class_2").mkdir()
    return root


@pytest.mark.parametrize(
    "data,needle",
    [
        (lambda t, w: ["data.kind=folder", f"data.root={t / 'absent'}"], "does not exist"),
        (lambda t, w: ["data.kind=folder", f"data.root={_empty_class(t, w)}"], "has no images"),
        (lambda t, w: ["data.kind=imagenet", f"data.root={t / 'absent'}"], "ImageNet root"),
        (lambda t, w: ["data.kind=cifar100", "data.root=null"], "data.root: set it to"),
        (lambda t, w: ["data.kind=cifar100", f"data.root={t / 'absent'}"], "does not exist"),
    ],
    ids=["missing-folder", "empty-class-folder", "missing-imagenet", "no-root", "missing-cifar"],
)
def test_a_dry_run_fails_on_missing_data_unless_fake_data_is_asked_for(
    tmp_path, write_images, capsys, data, needle
):
    argv = sets(*FAST, *data(tmp_path, write_images))
    rc, out, err = _run(capsys, "--dry-run", *argv)
    assert rc == 2 and "dry run ok" not in out
    assert err.startswith("normkd: error: ") and len(err.splitlines()) == 1 and needle in err
    rc, out, err = _run(capsys, "--dry-run", "--fake-data", *argv)
    assert rc == 0, err
    assert "dry run ok (FAKE data" in out


def test_fake_data_goes_with_dry_run_only(tmp_path, capsys):
    argv = sets(*FAST, "data.kind=folder", f"data.root={tmp_path}", f"engine.out_dir={tmp_path}")
    rc, _out, err = _run(capsys, "--fake-data", *argv)
    assert rc == 2 and err == (
        "normkd: error: --fake-data goes with --dry-run: random images can check a recipe, not "
        "train a model"
    )
    rc, _out, err = _run(capsys, *argv, *sets("data.fake=true"))  # the key, set by hand
    assert rc == 2 and "data.fake: random images can check a recipe" in err
    assert not any(tmp_path.rglob("config.yaml"))


def test_digits_ship_with_normkd_so_fake_data_changes_nothing(capsys):
    rc, out, _err = _run(capsys, "--dry-run", "--fake-data", *sets(*FAST))
    assert rc == 0 and "dry run ok: demo_teacher" in out and "-> logits (4, 10)" in out
