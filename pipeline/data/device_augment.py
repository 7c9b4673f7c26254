"""Loader batches -> network inputs on the device, without waiting for the device.

A loader batch is uint8 [N,3,H,W], contiguous or channels_last (a view of HWC pixels). It
goes to the device as uint8 (a quarter of float32's bytes), and one function there
(``distort_normalize``, compiled where ``model.compile`` is on) turns it into the
distorted, normalised batch in the compute dtype and memory format the model runs in.

Nothing here makes the host wait for the device: the normalisation constants are put on the
device once; the per-image distortion draws are made on the CPU (from the same seeded
generator as before, so a run is reproducible and resumes exactly) and copied from pinned
memory without blocking.
"""
from __future__ import annotations

import torch

from imaging.photometric import blend_params, distort_normalize
from imaging.specs import IMAGENET_MEAN, IMAGENET_STD, PhotometricSpec

COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceInput:
    def __init__(self, device: torch.device, *, channels_last: bool, mixed_precision: str = "no",
                 photometric: PhotometricSpec | None = None, compile_mode: str | None = None,
                 compile_backend: str = "inductor"):
        """``photometric``: distort training batches here (None: not at all, or in the loader
        workers). ``compile_mode``: torch.compile's mode for the transform (None: eager)."""
        self.device = torch.device(device)
        self.photometric = photometric
        self.dtype = COMPUTE_DTYPES[mixed_precision]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.transform = distort_normalize
        if compile_mode is not None:
            # Static shapes: the training batch never changes; validation's batch size and its
            # short last batch cost one more compilation each.
            self.transform = torch.compile(distort_normalize, mode=compile_mode, backend=compile_backend,
                                           dynamic=False)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
                 distort: bool = True) -> torch.Tensor:
        """uint8 [N,3,H,W] from a loader -> the network's input on the device; training batches
        are distorted with draws from ``generator`` (``distort=False``: evaluation batches)."""
        images = images.to(self.device, non_blocking=True)
        params = None
        if distort and self.photometric is not None:
            params = blend_params(images.shape[0], self.photometric, generator)
            if self.device.type == "cuda":
                params = params.pin_memory()  # then the copy below does not wait for the device
            params = params.to(self.device, non_blocking=True)
        return self.transform(images, params, self.mean, self.std, self.dtype, self.memory_format)
