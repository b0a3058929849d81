"""normkd.distill from Python: your torchvision teacher, your student, your DataLoaders.

    python examples/python_api.py --data /data/my_images            # one sub-folder per class
    python examples/python_api.py --data DIR --teacher-weights teacher.pth

Without --teacher-weights the teacher (a torchvision ResNet-18) is first trained on the same data
with method="vanilla", so the script runs end to end on any image folder. --seed fixes the models'
initial weights and the runs' data order: the same seed gives the same result. The distilled student
comes back merged (its own architecture, FT folded into the classifier) and is saved to
OUT/student.pt; the run directory holds metrics.csv, checkpoints and summary.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, random_split
from torchvision import transforms as T

import normkd


def loaders(root: Path, image_size: int, batch_size: int, workers: int):
    """Ordinary torchvision data code: an ImageFolder split 80/20 into two DataLoaders."""
    tf = T.Compose(
        [
            T.Resize((image_size, image_size)),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    full = torchvision.datasets.ImageFolder(str(root), transform=tf)
    n_val = max(1, len(full) // 5)
    train_set, val_set = random_split(
        full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(0)
    )
    train = DataLoader(train_set, batch_size, shuffle=True, drop_last=True, num_workers=workers)
    val = DataLoader(val_set, batch_size, num_workers=workers)
    return train, val, len(full.classes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", type=Path, required=True, help="image folder, one sub-folder per class"
    )
    p.add_argument("--teacher-weights", type=Path, help="a trained ResNet-18 state_dict file")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/python_api"))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    args = p.parse_args()
    torch.manual_seed(args.seed)  # the torchvision models below draw their initial weights now

    train, val, num_classes = loaders(args.data, args.image_size, args.batch_size, args.workers)
    run = {
        "out_dir": args.out,
        "device": args.device,
        "lr": args.lr,
        "seed": args.seed,
        "overwrite": True,
        "quiet": True,
    }

    teacher = torchvision.models.resnet18(num_classes=num_classes)
    if args.teacher_weights is not None:
        teacher.load_state_dict(torch.load(args.teacher_weights, weights_only=True))
    else:  # no teacher yet: train one on the same data (method="vanilla" needs no teacher)
        trained = normkd.distill(
            None,
            teacher,
            train,
            val,
            method="vanilla",
            epochs=args.teacher_epochs,
            run_name="teacher",
            **run,
        )
        teacher = trained.student
        print(f"teacher: top-1 {trained.final_top1:.2f}%")

    # The three lines that matter: a small student, one call, a deployable model back.
    student = torchvision.models.mobilenet_v3_small(num_classes=num_classes)
    result = normkd.distill(
        teacher, student, train, val, method="norm+kd", epochs=args.epochs, n=4, **run
    )
    print(
        f"student: best top-1 {result.best_top1:.2f}%, final {result.final_top1:.2f}% "
        f"(merged: {result.merged_top1:.2f}%), run directory {result.run_dir}"
    )
    torch.save(result.student.state_dict(), args.out / "student.pt")
    print(f"saved {args.out / 'student.pt'} ({type(result.student).__name__})")


if __name__ == "__main__":
    main()
