"""Every field of a deployed model's metadata, read back from model.safetensors after a run.

A deployment rebuilds the model and prepares its inputs from this metadata alone, so each field is
checked against what the run really used, known here independently of the code that wrote it: the
model's name, class and constructor keywords, the class count and names of the image folder, the
input shape of its crops, ImageNet's normalisation (the folder kind's), the recipe's name. The
exact key set is pinned too, so a field added later gets a check here, not silence.
"""

from __future__ import annotations

import json

from safetensors import safe_open

from normkd.cli import main
from normkd.engine.checkpoint import load_model_file
from normkd.models import create_model
from support import CONFIGS, sets


def test_every_metadata_field_reads_back_as_the_run_used_it(tmp_path, write_images):
    root = write_images(tmp_path / "images", classes=3, per_class=8, size=20)
    argv = ["train", str(CONFIGS / "demo" / "teacher.yaml"), "--out-dir", str(tmp_path / "runs")]
    over = ["data.kind=folder", f"data.root={root}", "data.image_size=16", "data.workers=0"]
    over += ["data.batch_size=8", "optim.epochs=1", "engine.device=cpu", "engine.quiet=true"]
    over += ["student.model=tinycnn", "student.kwargs={width: 4}", "engine.run_name=meta_run"]
    assert main([*argv, *sets(*over)]) == 0
    path = tmp_path / "runs" / "meta_run" / "model.safetensors"
    with safe_open(str(path), "pt") as fh:
        raw = json.loads(fh.metadata()["normkd"])
    model, meta = load_model_file(path)
    assert meta == raw
    fresh = create_model("tinycnn", num_classes=3, width=4)
    assert set(meta) == {
        "model", "class", "num_classes", "kwargs", "recipe", "input_shape", "mean", "std",
        "class_names",
    }  # fmt: skip
    assert meta["model"] == "tinycnn" and meta["kwargs"] == {"width": 4}
    assert meta["class"] == f"{type(fresh).__module__}.{type(fresh).__qualname__}"
    assert type(model) is type(fresh)
    assert meta["num_classes"] == 3
    assert meta["class_names"] == ["class_0", "class_1", "class_2"]
    assert meta["recipe"] == "demo_teacher"
    assert meta["input_shape"] == [3, 16, 16]
    assert meta["mean"] == [0.485, 0.456, 0.406]  # ImageNet's: what the folder kind feeds
    assert meta["std"] == [0.229, 0.224, 0.225]
