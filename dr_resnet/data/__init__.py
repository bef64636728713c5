"""Photos to tensors: dataset formats, the dataset, samplers, augmentation, preprocessing, splits, synthetic data."""
