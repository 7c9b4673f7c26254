"""FFCV input pipeline: the same contract as the WebDataset path, from ``.beton`` files.

Training: FFCV's random-resized-crop decoder with the configured area and aspect ranges,
then its flip, give uint8 NCHW batches; the photometric distortion, lighting and
normalisation are the trainer's, on the device, exactly as for the shards. FFCV resizes with
OpenCV's INTER_AREA only, so ``data.augment.interpolations`` (the paper's random choice of
interpolation) does not apply here; the trainer says so when it starts.

Distribution: FFCV's own ``distributed=True`` uses torch's DistributedSampler with
``drop_last=False``, which pads the last rank with repeated samples, and its sequential order
interleaves ranks. We order the samples ourselves instead: each training epoch is one
permutation of the file, the same on every rank (seeded by the run's seed and the epoch), and
rank r takes its own contiguous ``batches_per_epoch x batch`` slice of it, as the WebDataset
path does; a run resumed mid-epoch starts that slice after the batches it already did (the
same samples, though FFCV's crops are not seeded per sample). Validation gives each rank a
contiguous range of the file, so every sample is counted exactly once, nothing padded.

Test-time evaluation needs whole images, which FFCV's loader does not hand out:
``shards.ffcv_files.read_images(..., as_ffcv_decodes=True)`` reads them from the file and
decodes them with FFCV's own JPEG call, so that ``pipeline.inference.multi_crop.ffcv_crop_stack`` cuts the
trainer's validation pixels from them.
"""
from __future__ import annotations

import numpy as np

from pipeline.config import ConfigError
from shards.ffcv_files import FFCV_INSTALL_HINT

from .prepared import PreparedData, equal_ranges, mix_seed


def require_ffcv() -> None:
    try:
        import ffcv  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"data.format: ffcv: {FFCV_INSTALL_HINT} ({exc})") from None


def _epoch_slice_order(rank: int, samples_per_rank: int, seed: int):
    from ffcv.traversal_order.base import TraversalOrder

    class EpochSlice(TraversalOrder):
        """Rank ``rank``'s part of the epoch's permutation, without the batches already done."""

        def __init__(self):  # FFCV calls the order object with the loader (see __call__)
            self.start_batch = 0

        def __call__(self, loader):
            super().__init__(loader)
            return self

        def sample_order(self, epoch: int):
            permutation = np.random.default_rng(mix_seed(seed, epoch, "ffcv-order")).permutation(len(self.indices))
            mine = self.indices[permutation[rank * samples_per_rank: (rank + 1) * samples_per_rank]]
            return mine[self.start_batch * self.loader.batch_size:]

    return EpochSlice()


def _labels_pipeline():
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import ToTensor

    return [IntDecoder(), ToTensor()]


class FFCVInput:
    """Training batches per epoch and validation batches, as uint8 NCHW + int64 labels (+ no skip records)."""

    def __init__(self, data: PreparedData, *, batch_size: int, eval_batch_size: int, batches_per_epoch: int,
                 rank: int, world_size: int, seed: int, workers: int, image_size: int, eval_resize: int,
                 crop_area: tuple[float, float] | None, crop_ratio: tuple[float, float], flip: bool,
                 os_cache: bool = True):
        require_ffcv()
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

        self.train_path, self.val_path = data.train[0].url, data.val[0].url
        threads = max(1, workers)  # FFCV decodes in threads of this process, not in processes
        centre = CenterCropRGBImageDecoder((image_size, image_size), ratio=image_size / eval_resize)
        if crop_area is None:  # data.augment.crop: false
            train_decoder = CenterCropRGBImageDecoder((image_size, image_size), ratio=image_size / eval_resize)
        else:
            train_decoder = RandomResizedCropRGBImageDecoder((image_size, image_size), scale=tuple(crop_area),
                                                             ratio=tuple(crop_ratio))
        image_ops = [train_decoder] + ([RandomHorizontalFlip()] if flip else []) + [ToTensor(), ToTorchImage()]
        self.order = _epoch_slice_order(rank, batches_per_epoch * batch_size, seed)
        self.train = Loader(
            self.train_path, batch_size=batch_size, num_workers=threads, order=self.order, os_cache=os_cache,
            drop_last=True, pipelines={"image": image_ops, "label": _labels_pipeline()},
        )
        start, stop = equal_ranges(data.val_samples, world_size)[rank]
        self.val = None
        if stop > start:
            self.val = Loader(
                self.val_path, batch_size=eval_batch_size, num_workers=threads, order=OrderOption.SEQUENTIAL,
                indices=np.arange(start, stop), drop_last=False, os_cache=os_cache,
                pipelines={"image": [centre, ToTensor(), ToTorchImage()], "label": _labels_pipeline()},
            )

    def train_batches(self, epoch: int, start_batch: int = 0):
        self.order.start_batch = start_batch
        self.train.next_epoch = epoch
        for images, labels in self.train:
            yield images, labels.view(-1).long(), ()  # no skip records: FFCV reads or raises

    def val_batches(self):
        if self.val is None:
            return
        for images, labels in self.val:
            yield images, labels.view(-1).long(), ()

