"""The data axis: dataset registry (`build_dataset`), batched on-device augmentation (`BatchAugment`),
and the training / evaluation loaders (`build_train_loader`, `iterate_shard`)."""
from data.augment import (AugmentParams, BatchAugment, EvalTransform, build_batch_augments, build_eval_transform,
                          build_sample_transform, normalize)
from data.config import AugmentConfig, DataConfig
from data.datasets import (DATASETS, ImageData, build_dataset, build_eval_dataset, build_train_dataset,
                           decode_files)
from data.loaders import (DeviceTensorLoader, TrainBatch, TrainLoader, WorkersLoader, build_train_loader,
                          iterate_shard, shard_bounds)

__all__ = [
    "AugmentConfig", "AugmentParams", "BatchAugment", "DATASETS", "DataConfig", "DeviceTensorLoader",
    "EvalTransform", "ImageData", "TrainBatch", "TrainLoader", "WorkersLoader", "build_batch_augments",
    "build_dataset", "build_eval_dataset", "build_eval_transform", "build_sample_transform",
    "build_train_dataset", "build_train_loader", "decode_files", "iterate_shard", "normalize", "shard_bounds",
]
