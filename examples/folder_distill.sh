#!/usr/bin/env bash
# Distil a timm teacher into a small student on an image folder, all through the CLI.
#
#   DATA=/data/my_images bash examples/folder_distill.sh
#
# DATA holds one sub-folder of images per class (or train/<class>/ and val/<class>/).
# With TEACHER_WEIGHTS=FILE the teacher is yours; without, step 1 trains one on DATA first.
# Other knobs: OUT (runs/folder), TEACHER (timm:resnet26d), STUDENT
# (torchvision:mobilenet_v3_small), EPOCHS (30),
# TEACHER_EPOCHS (EPOCHS), IMAGE_SIZE (224), BATCH (64), DEVICE (auto). Arguments are passed
# on to both normkd commands, e.g.: bash examples/folder_distill.sh --set optim.lr=0.01
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${DATA:?set DATA to your image folder}"
OUT="${OUT:-runs/folder}"
TEACHER="${TEACHER:-timm:resnet26d}"
STUDENT="${STUDENT:-torchvision:mobilenet_v3_small}"
EPOCHS="${EPOCHS:-30}"
TEACHER_EPOCHS="${TEACHER_EPOCHS:-$EPOCHS}"
IMAGE_SIZE="${IMAGE_SIZE:-224}"
BATCH="${BATCH:-64}"
DEVICE="${DEVICE:-auto}"
NORMKD="${NORMKD:-normkd}"
recipe="$here/folder_norm_kd.yaml"
common=(--out-dir "$OUT" --overwrite
  --set "data.root=$DATA" --set "data.image_size=$IMAGE_SIZE" --set "data.batch_size=$BATCH"
  --set "engine.device=$DEVICE" "$@")

if [[ -z "${TEACHER_WEIGHTS:-}" ]]; then
  echo "== 1. train the teacher ($TEACHER) on $DATA"
  "$NORMKD" train "$recipe" "${common[@]}" --set name=folder_teacher --set task=train \
    --set teacher=null --set "student.model=$TEACHER" --set 'loss=[{kind: ce}]' \
    --set "optim.epochs=$TEACHER_EPOCHS"
  TEACHER_WEIGHTS="$OUT/folder_teacher/model.safetensors"
fi

echo "== 2. distil $TEACHER into $STUDENT with NORM + KD"
"$NORMKD" distill "$recipe" "${common[@]}" --set "teacher.model=$TEACHER" \
  --set "teacher.weights=$TEACHER_WEIGHTS" --set "student.model=$STUDENT" \
  --set "optim.epochs=$EPOCHS"

echo "== 3. the deployable student (FT merged): accuracy and ONNX"
"$NORMKD" eval "$OUT/folder_norm_kd"
# The input shape (and mean/std, class names) come from the run and go into the ONNX metadata.
"$NORMKD" export "$OUT/folder_norm_kd" --onnx "$OUT/folder_norm_kd/student.onnx" --force
