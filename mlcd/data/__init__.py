"""Data: shard writing, label files beside the shards, the webdataset loaders, dataset sources."""
