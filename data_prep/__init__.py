"""data_prep: turn image-caption collections (and the synthetic world) into webdataset shards."""
