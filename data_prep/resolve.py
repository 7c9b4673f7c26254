"""What a source path is: class folders, an ILSVRC2012 tar, flat files labelled by a file or the
devkit, or a CIFAR-10/100 or STL-10 binary archive; and its samples, scanned by ``sources`` or
``archives``."""
from __future__ import annotations

from pathlib import Path

from . import archives, sources
from .sources import SampleRef, SourceError


def resolve_train(path: Path) -> list[SampleRef]:
    if not path.exists():
        raise SourceError(f"{path}: training source not found")
    if sources.is_tar(path):
        return sources.scan_train_tar(path)
    if archives.is_dataset_archive(path):
        return archives.scan_archive(path, "train")
    if path.is_dir():
        return sources.scan_class_folders(path)
    raise SourceError(f"{path}: expected a folder of class folders, an ILSVRC2012 train .tar, or a CIFAR-10/100 "
                      f"or STL-10 binary .tar.gz")


def resolve_val(path: Path, val_labels: Path | None, devkit: Path | None) -> list[SampleRef]:
    """Validation as class folders, or flat files / a flat tar labelled by a file or the devkit."""
    if not path.exists():
        raise SourceError(f"{path}: validation source not found")
    if archives.is_dataset_archive(path):
        if val_labels is not None or devkit is not None:
            raise SourceError(f"{path}: the archive holds its own test labels; drop --val-labels/--devkit")
        return archives.scan_archive(path, "val")  # the archive's test split
    if val_labels is not None:
        return sources.labelled_flat(path, sources.read_val_labels(val_labels), str(val_labels))
    if devkit is not None:
        _, val_wnids = sources.read_devkit(devkit)
        # The devkit's ground truth lists classes in validation-file order: ILSVRC2012_val_00000001 ...
        labels = {f"ILSVRC2012_val_{i:08d}": w for i, w in enumerate(val_wnids, start=1)}
        return sources.labelled_flat(path, labels, str(devkit))
    if path.is_dir() and any(d.is_dir() for d in path.iterdir()):
        return sources.scan_class_folders(path)
    raise SourceError(f"{path}: flat validation files need --val-labels or --devkit")
