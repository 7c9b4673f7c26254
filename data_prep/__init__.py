"""Turn image collections and the ILSVRC2012 archives into WebDataset shards."""
