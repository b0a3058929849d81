"""The examples run as a user would run them, on a generated image folder (1-2 tiny epochs)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from normkd.models import create_model, load_weights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # normkd
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread, no oversubscription
    return env


def _run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_folder_distill_sh(tmp_path, image_folder):
    env = _env() | {
        "DATA": str(image_folder),
        "OUT": str(tmp_path / "runs"),
        "TEACHER": "timm:resnet10t",
        "EPOCHS": "1",
        "TEACHER_EPOCHS": "1",
        "IMAGE_SIZE": "32",
        "BATCH": "10",
        "DEVICE": "cpu",
    }
    extra = ["--quiet", "--set", "data.workers=0", "--set", "optim.lr=0.01"]
    out = _run(["bash", str(EXAMPLES / "folder_distill.sh"), *extra], env)
    run = tmp_path / "runs" / "folder_norm_kd"
    assert "done: folder_teacher" in out and "done: folder_norm_kd" in out
    assert (tmp_path / "runs" / "folder_teacher" / "model.safetensors").is_file()
    assert (run / "student.onnx").is_file() and "onnxruntime max |logit diff|" in out
    import json

    import onnx

    props = {
        e.key: json.loads(e.value) for e in onnx.load(str(run / "student.onnx")).metadata_props
    }
    assert props["input_shape"] == [3, 32, 32]  # the run's data.image_size, not a default
    assert props["class_names"] == sorted(p.name for p in image_folder.iterdir() if p.is_dir())
    assert props["mean"] == [0.485, 0.456, 0.406]  # the folder loader's ImageNet normalisation
    student = create_model("torchvision:mobilenet_v3_small", num_classes=3)
    load_weights(student, run / "model.safetensors")  # plain architecture: FT was merged


def test_python_api_py(tmp_path, write_images):
    """Deterministic and not by a lucky seed. The example seeds its models (--seed, default 0);
    unseeded, its teacher trained for 6 tiny epochs ended, about once in ten runs, at 5 of 14
    validation images (35.7%) and distill's chance check (50% for 3 classes) refused it, as it
    should. 10 epochs: 100% for each of seeds 1-7 (seed 2 had that 35.7% at 6)."""
    data = write_images(tmp_path / "images", per_class=24)
    out_dir = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out_dir), "--image-size", "32", "--lr", "0.02"]
    args += ["--epochs", "1", "--teacher-epochs", "10", "--batch-size", "8", "--workers", "0"]
    out = _run([sys.executable, str(EXAMPLES / "python_api.py"), *args, "--device", "cpu"], _env())
    assert "teacher: top-1" in out and "student: best top-1" in out
    assert (out_dir / "distill_norm_kd" / "metrics.csv").is_file()
    state = torch.load(out_dir / "student.pt", weights_only=True)
    assert "classifier.0.weight" in state  # a plain torchvision MobileNetV3: FT merged away


def test_pretrained_folder_sh(tmp_path, image_folder):
    """Pretrained teacher + pretrained student + an image folder, with stand-in checkpoints the
    example writes itself: both heads are replaced, the student deploys merged, ONNX labelled."""
    env = _env() | {
        "DATA": str(image_folder),
        "OUT": str(tmp_path / "runs"),
        "STAND_IN": "1",
        "EPOCHS": "1",
        "TEACHER_EPOCHS": "1",
        "IMAGE_SIZE": "32",
        "BATCH": "10",
        "DEVICE": "cpu",
        "PYTHON": sys.executable,
    }
    extra = ["--quiet", "--set", "data.workers=0"]
    out = _run(["bash", str(EXAMPLES / "pretrained_folder.sh"), *extra], env)
    assert out.count("kept a new classifier (3 classes) instead of the checkpoint's 1000") == 2
    run = tmp_path / "runs" / "pretrained_norm_kd"
    assert "done: pretrained_norm_kd" in out and "top-1" in out
    assert (run / "student.onnx").is_file() and "onnxruntime max |logit diff|" in out
    student = create_model("torchvision:mobilenet_v3_small", num_classes=3)
    load_weights(student, run / "model.safetensors")  # plain architecture: FT was merged
