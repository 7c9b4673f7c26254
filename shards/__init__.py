"""The prepared-data format that ``data_prep`` writes and ``pipeline`` reads: the manifest
(``manifest``), each tar shard's byte-offset index (``tar_index``) and all of them in one object
(``dataset_index``), where a dataset lives, a folder or an object store (``store``), one ranged HTTP(S) read that
checks the answer before reading its body (``ranged_read``), the process's S3 credentials,
looked up once (``credentials``), reading
shards from a store in ranged reads through a local cache (``remote``), FFCV's ``.beton``
files (``ffcv_files``), and the CPUs a process may use, which size every pool of workers (``cpus``)."""
