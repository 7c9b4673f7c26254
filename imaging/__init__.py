"""Images, shared by preparation and training: decoding only what a crop needs (the region JPEG
decoder and resampling in C, ``jpeg_region``), crop sampling, photometric transforms.

Submodules are imported on their own: ``imaging.specs`` (the parameters) loads neither Pillow
nor torch nor the C library.
"""
