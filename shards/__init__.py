"""The prepared-data format that ``data_prep`` writes and ``pipeline`` reads: the manifest
(``manifest``), each tar shard's byte-offset index (``tar_index``) and all of them in one object
(``dataset_index``), where a dataset lives, a folder or an object store (``store``), reading
shards from a store in ranged reads through a local cache (``remote``), and FFCV's ``.beton``
files (``ffcv_files``)."""
