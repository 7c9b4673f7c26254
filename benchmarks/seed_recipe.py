"""The seeds' own CIFAR-10 recipe as a plain PyTorch loop, for comparison with this project's.

    python -m benchmarks.seed_recipe --train /tmp/cifar10/train --val /tmp/cifar10/test --out runs/seed_recipe
    python -m pipeline.train.report runs/seed_recipe runs/cifar10 --targets 90 93 94 --plot tta.png

What the project's origin notebooks did, reading the same images as this project (class folders,
through torchvision's ``ImageFolder`` instead of ``torchvision.datasets.CIFAR10``): torchvision's
GoogLeNet with batch norm (``torchvision.models.googlenet``, untrained, 10 classes, its main head
only), the 32x32 images resized to 224 (``Resize`` + ``ToTensor`` + ImageNet ``Normalize``, no
augmentation), Adam at lr 1e-3, batch 32, shuffled, 15 epochs, float32. The test set is
evaluated after every epoch.

It writes what ``python -m pipeline.train.report`` reads: ``OUT/metrics.jsonl`` (one record per epoch:
step, epoch, validation top-1/top-5 error, and ``train_seconds``, the clock from the first
training step to the end of that epoch's validation, as the trainer's clock also includes its
validations) and ``OUT/config.yaml`` (the model's name, for the table).

``--time-limit S`` stops training when the clock reaches S seconds and evaluates then (the GPU
report runs it for one minute); each record also has the epoch's training rate (``images_per_sec``).
``--smoke``: a few steps at 32 px on the CPU, to check that the loop runs (the tests do).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def loader(folder: Path, image_size: int, batch_size: int, workers: int, shuffle: bool) -> DataLoader:
    transform = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: DataLoader, device: torch.device) -> tuple[float, float, int]:
    """(top-1 error, top-5 error, images) over every image of ``batches``."""
    model.eval()
    count = top1 = top5 = 0
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        best = model(images).topk(min(5, model.fc.out_features), dim=1).indices
        hits = best.eq(labels[:, None])
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += len(labels)
    model.train()
    return 1 - top1 / count, 1 - top5 / count, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seed_recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="class folders of training images")
    parser.add_argument("--val", type=Path, required=True, help="class folders of test images")
    parser.add_argument("--out", type=Path, required=True, help="run directory for metrics.jsonl")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader worker processes")
    parser.add_argument("--max-steps", type=int, help="stop each epoch after this many steps (smoke runs)")
    parser.add_argument("--time-limit", type=float,
                        help="stop training once the clock passes this many seconds, then evaluate (one-minute runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 3 steps at 32 px: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.image_size, args.max_steps = 1, 32, 3

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = loader(args.train, args.image_size, args.batch_size, args.workers, shuffle=True)
    val = loader(args.val, args.image_size, 2 * args.batch_size, args.workers, shuffle=False)
    if val.dataset.classes != train.dataset.classes:
        print(f"error: {args.val} and {args.train} hold different classes", file=sys.stderr)
        return 2
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                         num_classes=len(train.dataset.classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    criterion = torch.nn.CrossEntropyLoss()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.yaml").write_text(
        "# benchmarks/seed_recipe.py: torchvision googlenet, Adam, no augmentation\n"
        f"model:\n  name: googlenet_bn\ndata:\n  image_size: {args.image_size}\n  batch_size: {args.batch_size}\n"
        f"optim:\n  name: adam\n  lr: {args.lr}\nschedule:\n  epochs: {args.epochs}\n")
    metrics = args.out / "metrics.jsonl"
    metrics.write_text("")
    print(f"{len(train.dataset)} training / {len(val.dataset)} test images, {len(train.dataset.classes)} classes, "
          f"{device}", file=sys.stderr)
    step, clock = 0, 0.0
    for epoch in range(args.epochs):
        started = time.perf_counter()
        model.train()
        loss_sum = seen = 0
        for i, (images, labels) in enumerate(train):
            if args.max_steps is not None and i >= args.max_steps:
                break
            if args.time_limit is not None and clock + time.perf_counter() - started >= args.time_limit:
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        images_per_sec = seen / (time.perf_counter() - started)  # training alone (loss.item() waited for the device)
        top1, top5, count = evaluate(model, val, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock += time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1), "val_top1_error": top1,
                  "val_top5_error": top5, "val_samples": count, "train_seconds": clock, "train_images": seen,
                  "images_per_sec": images_per_sec}
        with open(metrics, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        print(f"epoch {epoch + 1}: train loss {record['train_loss']:.3f}, val top-1/top-5 error "
              f"{top1:.4f}/{top5:.4f} on {count} images, {images_per_sec:.0f} img/s, {clock:.0f}s", file=sys.stderr)
        if args.time_limit is not None and clock >= args.time_limit:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
