"""Input: prepared data (shards or FFCV files, or decoded into memory) to device batches.

``prepared`` cuts the samples into each (rank, loader worker)'s range, ``batches`` builds uint8
batches in the workers, ``webdataset_input``, ``ffcv_input``, ``memory_input`` and ``dali_input``
(the shards decoded by NVIDIA DALI, on the GPU or its CPU operators) are the four loaders with
one contract, and ``device_augment`` turns their batches into network inputs on the device."""
