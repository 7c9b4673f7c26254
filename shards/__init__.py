"""The prepared-data format that ``data_prep`` writes and ``pipeline`` reads: the manifest
(``manifest``), each tar shard's byte-offset index (``tar_index``) and FFCV's ``.beton`` files
(``ffcv_files``)."""
