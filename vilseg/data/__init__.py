"""Data: the synthetic world, multi-crop augmentation and the webdataset training stream."""
