#!/usr/bin/env bash
# The practitioner's path: a pretrained teacher, a pretrained small student, your image folder ->
# a deployable student (its own architecture, FT merged) with an ONNX file.
#
#   DATA=/data/my_images TEACHER_CKPT=resnet18-f37072fd.pth \
#     STUDENT_CKPT=mobilenet_v3_small-047dcff4.pth bash examples/pretrained_folder.sh
#
# TEACHER_CKPT / STUDENT_CKPT are torchvision's ImageNet checkpoints (1000 classes) for
# torchvision:resnet18 and torchvision:mobilenet_v3_small, fetched by you: normkd downloads
# nothing. Their classifiers are replaced by fresh ones for your classes (one line says so).
# Without them, STAND_IN=1 writes random-weight 1000-class checkpoints of the same layout first,
# so the whole workflow runs anywhere (the tests do this); the accuracy it reaches then means
# nothing. Other knobs: OUT (runs/pretrained), TEACHER_EPOCHS (5), EPOCHS (20), IMAGE_SIZE (224),
# BATCH (64), DEVICE (auto). Arguments go on to both training commands (--set key=value ...).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${DATA:?set DATA to your image folder (one sub-folder per class)}"
OUT="${OUT:-runs/pretrained}"
TEACHER_EPOCHS="${TEACHER_EPOCHS:-5}"
EPOCHS="${EPOCHS:-20}"
IMAGE_SIZE="${IMAGE_SIZE:-224}"
BATCH="${BATCH:-64}"
DEVICE="${DEVICE:-auto}"
NORMKD="${NORMKD:-normkd}"
PYTHON="${PYTHON:-python}"
recipe="$here/folder_norm_kd.yaml"

if [[ "${STAND_IN:-0}" == 1 ]]; then
  mkdir -p "$OUT/stand_in"
  TEACHER_CKPT="$OUT/stand_in/resnet18_imagenet_stand_in.pth"
  STUDENT_CKPT="$OUT/stand_in/mobilenet_v3_small_imagenet_stand_in.pth"
  echo "== 0. STAND-IN checkpoints (random weights, torchvision's 1000-class layout)"
  "$PYTHON" - "$TEACHER_CKPT" "$STUDENT_CKPT" <<'PY'
import sys, torch, torchvision
for name, path in zip(("resnet18", "mobilenet_v3_small"), sys.argv[1:]):
    torch.save(torchvision.models.get_model(name, num_classes=1000).state_dict(), path)
PY
fi
: "${TEACHER_CKPT:?set TEACHER_CKPT (torchvision resnet18 ImageNet file) or STAND_IN=1}"
: "${STUDENT_CKPT:?set STUDENT_CKPT (torchvision mobilenet_v3_small ImageNet file) or STAND_IN=1}"
common=(--out-dir "$OUT" --overwrite
  --set "data.root=$DATA" --set "data.image_size=$IMAGE_SIZE" --set "data.batch_size=$BATCH"
  --set "engine.device=$DEVICE")

echo "== 1. fine-tune the pretrained teacher (torchvision:resnet18) on $DATA"
"$NORMKD" train "$recipe" "${common[@]}" --set name=pretrained_teacher --set task=train \
  --set teacher=null --set student.model=torchvision:resnet18 \
  --set "student.weights=$TEACHER_CKPT" --set 'loss=[{kind: ce}]' --set optim.lr=0.01 \
  --set "optim.epochs=$TEACHER_EPOCHS" "$@"

echo "== 2. distil it into the pretrained student (torchvision:mobilenet_v3_small), NORM + KD"
"$NORMKD" distill "$recipe" "${common[@]}" --set name=pretrained_norm_kd \
  --set teacher.model=torchvision:resnet18 \
  --set "teacher.weights=$OUT/pretrained_teacher/model.safetensors" \
  --set student.model=torchvision:mobilenet_v3_small --set "student.weights=$STUDENT_CKPT" \
  --set optim.lr=0.01 --set "optim.epochs=$EPOCHS" "$@"

echo "== 3. the deployable student: accuracy, and ONNX (input size, mean/std, classes inside)"
"$NORMKD" eval "$OUT/pretrained_norm_kd"
"$NORMKD" export "$OUT/pretrained_norm_kd" --onnx "$OUT/pretrained_norm_kd/student.onnx" --force
