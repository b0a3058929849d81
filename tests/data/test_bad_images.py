"""Bad files in an image folder: found when the folder is scanned (header only) or when an image
is decoded, named on one line (exit 2 through the CLI, also from DataLoader workers), or left
out and counted with ``data.skip_bad``."""

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from normkd.cli import main
from normkd.config import recipe_from_dict
from normkd.data import folder_datasets, folder_loaders, imagenet_loaders
from normkd.data.imagenet import ImageError, find_bad_images
from normkd.errors import DataError
from support import DEMO, recipe_data, sets


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none: its header is all
    that a scan reads, and it is what a decompression bomb looks like there."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in its pixel data: its header reads fine, decoding it fails."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


BAD = {
    "text-named-jpg": (lambda p: p.write_text("not an image"), "x.jpg", "cannot identify image"),
    "empty-png": (lambda p: p.write_bytes(b""), "x.png", "empty file"),
    "absurd-size": (lambda p: p.write_bytes(_png_header(10_000, 10_000)), "x.png", "over PIL's"),
    "bomb": (lambda p: p.write_bytes(_png_header(100_000, 100_000)), "x.png", "exceeds limit"),
}


def _recipe(root, **data):
    return recipe_from_dict(
        {
            "name": "f",
            "task": "train",
            "data": {"kind": "folder", "root": root, "image_size": 16, "workers": 0, **data},
            "student": {"model": "resnet8"},
        }
    )


@pytest.mark.parametrize("case", list(BAD))
def test_a_file_that_is_no_image_is_named_when_the_folder_is_scanned(image_folder, case):
    write, name, reason = BAD[case]
    write(image_folder / "class_1" / name)
    with pytest.raises(DataError) as info:
        folder_datasets(image_folder, image_size=16)
    msg = str(info.value)
    assert "\n" not in msg and "1 file(s) are no readable image" in msg
    assert f"{image_folder / 'class_1' / name} (" in msg and reason in msg
    assert "data.skip_bad: true" in msg


def test_skip_bad_leaves_them_out_counts_them_and_says_so(image_folder, capsys):
    for case, (write, name, _reason) in BAD.items():
        write(image_folder / "class_2" / f"{case}_{name}")
    data = recipe_data(_recipe(image_folder, skip_bad=True, batch_size=4))
    skipped = data.info["skipped"]
    assert skipped["count"] == len(BAD) and len(skipped["files"]) == len(BAD)
    assert any("empty-png_x.png: empty file" in f for f in skipped["files"])
    assert data.info["n_train"] + data.info["n_val"] == 36  # the 12 good images of each class
    assert "data: left out 4 file(s) that are no readable image (data.skip_bad)" in (
        capsys.readouterr().out
    )
    x, _y, _idx = next(iter(data.train))  # what is left loads
    assert x.shape == (4, 3, 16, 16)


def test_skip_bad_in_a_train_val_layout_and_a_class_left_empty(tmp_path, write_images):
    root = write_images(tmp_path / "split", split=(3, 2))
    BAD["empty-png"][0](root / "val" / "class_0" / "bad.png")
    train, val, _classes, info = folder_datasets(root, image_size=16, skip_bad=True)
    assert (len(train), len(val), info["skipped"]["count"]) == (9, 6, 1)
    for f in (root / "val" / "class_1").iterdir():
        f.write_bytes(b"")
    with pytest.raises(DataError, match=r"class folder\(s\) class_1 have no readable image left"):
        folder_datasets(root, image_size=16, skip_bad=True)


def test_imagenet_folders_are_checked_and_skipped_too(tmp_path, write_images):
    root = write_images(tmp_path / "inet", split=(3, 2))
    BAD["text-named-jpg"][0](root / "train" / "class_0" / "x.JPEG")
    with pytest.raises(DataError, match=r"ImageNet folder .*train: 1 file\(s\).*x\.JPEG"):
        imagenet_loaders(root, 2, 0)
    train, _val, _k = imagenet_loaders(root, 2, 0, skip_bad=True)
    assert len(train.dataset) == 9 and len(train.dataset.base.skipped) == 1


def test_the_scan_reads_headers_and_decodes_no_pixels(image_folder, monkeypatch):
    """Decoding every image of a big folder would take hours; a header costs microseconds."""

    def no_decoding(self):
        raise AssertionError("the scan decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    assert len(paths) == 36 and find_bad_images(paths * 20) == []  # 720 files: threads


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_cut_short_is_named_when_it_is_decoded(image_folder, workers):
    bad = _truncated_jpeg(image_folder / "class_0" / "cut.jpg")
    assert find_bad_images([str(bad)]) == []  # its header is fine: only decoding tells
    train, val, _k, _info = folder_loaders(
        image_folder, 8, workers, eval_batch_size=64, image_size=16
    )
    with pytest.raises(ImageError) as info:
        list(val) + list(train)
    msg = str(info.value)
    assert msg.startswith(f"cannot decode image {bad} (") and "truncated" in msg
    assert "\n" not in msg and "Traceback" not in msg and "worker" not in msg


def _one_line_exit_2(argv, capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("normkd: error: "), err
    return err.strip()


def _folder_argv(root, *extra) -> list[str]:
    return [
        "train",
        str(DEMO / "teacher.yaml"),
        *sets(
            "data.kind=folder",
            f"data.root={root}",
            "data.image_size=16",
            "data.batch_size=8",
            "student.model=resnet8",
            "engine.device=cpu",
            "engine.quiet=true",
            "optim.epochs=1",
            *extra,
        ),
    ]


def test_cli_a_bad_file_found_by_the_scan_is_one_line_and_exit_2(image_folder, tmp_path, capsys):
    BAD["text-named-jpg"][0](image_folder / "class_0" / "x.jpg")
    argv = _folder_argv(image_folder, "data.workers=0", f"engine.out_dir={tmp_path / 'runs'}")
    line = _one_line_exit_2(argv, capsys)
    assert f"{image_folder / 'class_0' / 'x.jpg'} (cannot identify image file" in line
    run = tmp_path / "runs" / "demo_teacher"
    assert not (run / "config.yaml").exists()  # refused before the run is written
    argv = [*argv, *sets("data.skip_bad=true")]
    assert main(argv) == 0
    data_json = json.loads((run / "data.json").read_text())
    assert data_json["skipped"]["count"] == 1
    assert data_json["skipped"]["files"][0].startswith(str(image_folder / "class_0" / "x.jpg"))


def test_cli_an_image_cut_short_in_a_worker_process_is_one_line_and_exit_2(image_folder, tmp_path):
    """In a real process with DataLoader workers: stderr holds the one line and nothing else."""
    bad = _truncated_jpeg(image_folder / "class_1" / "cut.jpg")
    argv = _folder_argv(image_folder, "data.workers=2", f"engine.out_dir={tmp_path / 'runs'}")
    proc = subprocess.run(
        [sys.executable, "-m", "normkd", *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"normkd: error: cannot decode image {bad} (image file is")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
