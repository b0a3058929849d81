"""Shared test settings: small thread count and deterministic seeds for the 2-core CI machine."""

import os
from pathlib import Path

import pytest
import torch

from support import DEMO, FAST, sets, write_image_folder

# `make test` runs two pytest-xdist workers on the 2-core machine: one thread each, and so every
# process a test starts (OMP_NUM_THREADS is inherited); a plain `pytest` run keeps both cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def write_images():
    """The folder writer, for tests that need other layouts (tests cannot import conftest)."""
    return write_image_folder


@pytest.fixture
def image_folder(tmp_path):
    """A generated 3-class folder of 32x32 PNGs, 12 per class, no train/val split."""
    return write_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def demo_teacher(tmp_path_factory) -> Path:
    """model.safetensors of a resnet8 demo teacher (2 epochs on 300 digits), trained once per
    session through the CLI; recipes that use it set ``teacher.model=resnet8``."""
    from normkd.cli import main

    out = tmp_path_factory.mktemp("demo_teacher")
    argv = ["train", str(DEMO / "teacher.yaml"), "--out-dir", str(out), "--quiet"]
    assert main([*argv, *sets(*FAST, "student.model=resnet8", "optim.epochs=2")]) == 0
    return out / "demo_teacher" / "model.safetensors"
